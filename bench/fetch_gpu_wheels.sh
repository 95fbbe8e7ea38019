#!/usr/bin/env bash
# Fetch the wheels of bench/gpu_wheels.txt into .whl/ (git-ignored) for the GPU machine
# (Python 3.12, manylinux x86_64, no network there), slim the three big ones, and copy the
# SmolLM2-135M config + tokenizer into .whl/smollm2-shape/. Run here, in the repo root, once;
# then bench/gpu_check.sh runs there with carry: [".whl"]. Prints the total (must stay < 64 MiB
# with the rest of the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
LIST=bench/gpu_wheels.txt

grep -qxF '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || echo '/.whl/' >>"$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$DEST"

# The device README's recipe, plus manylinux_2_24 (bitsandbytes, torchao are tagged so).
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mapfile -t PINS < <(sed -e 's/#.*//' "$LIST" | awk 'NF {print $1}')

for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  norm=$(echo "$name" | tr '-' '_' | tr '[:upper:]' '[:lower:]')
  if compgen -G "$DEST/${norm}-${pin##*==}-*.whl" >/dev/null \
     || compgen -G "$DEST/${name}-${pin##*==}-*.whl" >/dev/null; then
    continue
  fi
  if [[ $name == axolotl-contribs-lgpl ]]; then
    # Published as an sdist only: build the (pure-Python) wheel here.
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$pin"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$pin"
  fi
done

# Keep one version per package (two stop the whole install there).
"$PY" - "$DEST" "${PINS[@]}" <<'EOF'
import re, sys
from pathlib import Path
dest, pins = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
for whl in dest.glob("*.whl"):
    name, version = whl.name.split("-")[:2]
    if norm(name) not in want or want[norm(name)] != version:
        print(f"removing {whl.name} (not in the list)")
        whl.unlink()
EOF

# Slim: repack without files the check never loads; RECORD is rewritten to match.
"$PY" - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
dest = Path(sys.argv[1])
DROP = {
    "bitsandbytes": re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda130\.so|cuda132\.so|cpu\.so)"),
    "wandb": re.compile(r"wandb/bin/"),
    "litellm": re.compile(r"litellm/proxy/(_experimental|swagger)/"),
}
for name, pattern in DROP.items():
    for whl in dest.glob(f"{name}-*.whl"):
        with zipfile.ZipFile(whl) as src:
            infos = src.infolist()
            if not any(pattern.match(i.filename) for i in infos):
                continue  # already slim
            tmp = whl.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
                for info in infos:
                    if pattern.match(info.filename):
                        continue
                    data = src.read(info)
                    if info.filename.endswith(".dist-info/RECORD"):
                        lines = data.decode().splitlines(keepends=True)
                        data = "".join(l for l in lines if not pattern.match(l)).encode()
                    out.writestr(info, data)
        before = whl.stat().st_size
        tmp.replace(whl)
        print(f"slimmed {whl.name}: {before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB")
EOF

# The real SmolLM2-135M-Instruct config and tokenizer (from the embedded GGUF, converted once by
# copa), so the check can build a model of the same shape there (its weights do not fit: 93 MiB).
SHAPE="$DEST/smollm2-shape"
if [[ ! -f $SHAPE/tokenizer.json ]]; then
  src=$("$PY" -c 'from copa.models import resolve_model; print(resolve_model("smollm2-135m-instruct"))')
  mkdir -p "$SHAPE"
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json \
           chat_template.jinja special_tokens_map.json; do
    if [[ -f $src/$f ]]; then cp "$src/$f" "$SHAPE/"; fi
  done
fi

find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -k2 \
  | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
du -sb "$DEST" | awk '{printf "total carried (.whl): %.1f MiB of 64 MiB (the tracked tree travels too)\n", $1 / 1048576}'
