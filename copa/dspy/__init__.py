"""The DSPy side of copa: the template adapter, programs, metrics, the task kit shared by every
arm, and the prompt search. (Inside this package `import dspy` is the DSPy library itself.)"""
