#!/usr/bin/env bash
# One CUDA check of copa, for docs/performance.md. Runs on the GPU machine from the repo root:
#
#   bash bench/gpu_check.sh            # the device tool's `run`, with carry: [".whl"]
#
# .whl/ comes from bench/fetch_gpu_wheels.sh (run here first): the wheels of bench/gpu_wheels.txt
# (Axolotl, DSPy, bitsandbytes, ... ~50 MiB) and SmolLM2-135M's config + tokenizer. The real
# weights (93 MiB GGUF) do not fit in what a call may carry (64 MiB), so the model trained here
# has SmolLM2-135M's exact shape and tokenizer but RANDOM weights: timings are those of the
# 135M model; accuracies are not (see docs/performance.md, "CUDA").
#
# Sections (each records its exit status and time; a failed one does not stop the rest):
#   env        nvidia-smi, python, torch / CUDA
#   install    pip install the carried wheels into /tmp/site (no network there)
#   imports    versions of torch, transformers, peft, axolotl, dspy, bitsandbytes, flash_attn, vllm
#   model      SmolLM2-135M-shaped random model -> /tmp/smollm2-shape-random
#   qlora_loop transformers + peft + bitsandbytes only: NF4 QLoRA vs bf16 LoRA steps/s
#   copa_run   copa run recipes/iris.yaml on that model (QLoRA 4-bit + bf16 by `adapter: auto`;
#              flash attention / vLLM only where they import)
# Results: $OUT/gpu_check.json (+ gpu_check.log, the run's report and manifest, Axolotl's config
# and log tails): at most 8 files, as the device tool returns.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-/tmp/copa-gpu-check}
rm -rf "$WORK"
mkdir -p "$WORK"
PY=${PY:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
MODEL=$WORK/smollm2-shape-random
RUN_DIR=$WORK/run-iris
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export COPA_HOME=$WORK/copa-home HF_HOME=$WORK/hf-home

# section NAME TIMEOUT_S CMD...: run, log, record {name, rc, seconds}; never abort the script.
section() {
  local name=$1 limit=$2 start rc
  shift 2
  echo
  echo "=== [$name] $(date -u +%H:%M:%S) (limit ${limit}s)"
  start=$(date +%s.%N)
  set +e
  # A function cannot be timed out directly: run it in a child bash (functions are exported).
  timeout --kill-after=10 "$limit" bash -c "$*"
  rc=$?
  set -e
  awk -v n="$name" -v rc="$rc" -v a="$start" -v b="$(date +%s.%N)" \
    'BEGIN { printf "{\"name\": \"%s\", \"rc\": %d, \"seconds\": %.1f}\n", n, rc, b - a }' \
    >>"$WORK/sections.jsonl"
  echo "=== [$name] rc=$rc"
  return 0
}

env_report() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  nproc
  free -g || true
}

install_wheels() {
  compgen -G ".whl/*.whl" | wc -l
  du -sh .whl
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
}

imports() {
  "$PY" - "$WORK/imports.json" <<'EOF'
import importlib, json, sys, time
found = {}
for name in ["torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes",
             "torchao", "axolotl", "dspy", "litellm", "gguf", "flash_attn", "vllm", "copa"]:
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
        found[name] = {"version": getattr(module, "__version__", "?"),
                       "file": getattr(module, "__file__", None),
                       "import_s": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # noqa: BLE001 - a report of what does not import
        found[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(name, found[name])
import torch
found["_cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
json.dump(found, open(sys.argv[1], "w"), indent=1)
EOF
}

build_model() {
  "$PY" - .whl/smollm2-shape "$MODEL" <<'EOF'
import shutil, sys, time
from pathlib import Path
import torch, transformers
src, out = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
config = transformers.AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out)
for f in src.iterdir():
    if f.name not in ("config.json",) and not (out / f.name).exists():
        shutil.copy(f, out / f.name)
tok = transformers.AutoTokenizer.from_pretrained(out)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, vocab {len(tok)}, "
      f"chat template {'yes' if tok.chat_template else 'NO'}, {time.perf_counter() - start:.1f} s")
EOF
}

qlora_loop() {
  "$PY" - "$MODEL" "$WORK/qlora_loop.json" <<'EOF'
"""QLoRA (NF4 + bf16 compute) and bf16 LoRA train steps on the 135M shape: no Axolotl."""
import json, sys, time
import torch, transformers, peft
path, out = sys.argv[1], sys.argv[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, WARM, STEPS = 8, 96, 5, 40
results = {}
for arm in ("qlora_nf4_bf16", "lora_bf16"):
    try:
        kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
        if arm.startswith("qlora"):
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if arm.startswith("qlora"):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device="cuda")
        losses = []
        for step in range(WARM + STEPS):
            if step == WARM:
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[arm] = {"steps": STEPS, "batch": BATCH, "seq": SEQ,
                        "steps_per_s": round(STEPS / seconds, 2),
                        "tokens_per_s": round(STEPS * BATCH * SEQ / seconds),
                        "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3),
                        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                        "trainable_m": round(sum(p.numel() for p in model.parameters()
                                                 if p.requires_grad) / 1e6, 2)}
        del model, opt
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - recorded, the other arm still runs
        results[arm] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(arm, results[arm])
json.dump(results, open(out, "w"), indent=1)
EOF
}

copa_run() {
  local extra=()
  if "$PY" -c 'import vllm' 2>/dev/null; then extra+=(--set serve.engine=vllm); fi
  "$PY" -m copa.cli run recipes/iris.yaml --run-dir "$RUN_DIR" \
    --set "model.base=$MODEL" "${extra[@]}"
}

export REPO OUT WORK PY SITE MODEL RUN_DIR
export -f env_report install_wheels imports build_model qlora_loop copa_run

section env 60 env_report
section install 120 install_wheels
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH
section imports 120 imports
section model 90 build_model
section qlora_loop 120 qlora_loop
section copa_run "${COPA_RUN_LIMIT:-300}" copa_run

# Collect: at most 8 files come back from $OUT (gpu_check.log is one).
copy() { if [[ -f $1 ]]; then cp "$1" "$OUT/$2"; fi; }
copy "$RUN_DIR/report.md" copa_report.md
copy "$RUN_DIR/report.json" copa_report.json
copy "$RUN_DIR/manifest.json" copa_manifest.json
cfg=$(find "$RUN_DIR" -name axolotl.yml -print -quit 2>/dev/null || true)
if [[ -n $cfg ]]; then cp "$cfg" "$OUT/axolotl.yml"; fi
for f in train merge; do
  log=$(find "$RUN_DIR" -name "axolotl-$f.log" -print -quit 2>/dev/null || true)
  if [[ -n $log ]]; then tail -n 150 "$log" >"$OUT/axolotl-$f.tail.log"; fi
done

"$PY" - "$WORK" "$OUT/gpu_check.json" "$RUN_DIR" <<'EOF'
import json, sys
from pathlib import Path
work, out, run_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
result = {
    "sections": [json.loads(line) for line in (work / "sections.jsonl").read_text().splitlines()],
    "imports": load(work / "imports.json"),
    "qlora_loop": load(work / "qlora_loop.json"),
    "model": "SmolLM2-135M shape (real config + tokenizer), random weights: accuracies mean nothing",
}
manifest = load(run_dir / "manifest.json") or {}
result["copa_stage_seconds"] = {name: entry.get("seconds")
                                for name, entry in manifest.get("stages", {}).items()}
report = load(run_dir / "report.json") or {}
result["copa_report_keys"] = sorted(report)
for key in ("stage_seconds", "arms", "synergy", "versions", "hardware"):
    if key in report:
        result[f"copa_{key}"] = report[key]
out.write_text(json.dumps(result, indent=1))
print(json.dumps({k: result[k] for k in ("sections", "copa_stage_seconds")}, indent=1))
EOF
