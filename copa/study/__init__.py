"""Studies: one recipe over a grid of overrides and several seeds, every cell an ordinary run
directory, with the statistics across seeds (copa.study.spec reads the study file,
copa.study.execute runs the cells, copa.study.aggregate and copa.study.write make study.json,
study.md and study.png)."""
