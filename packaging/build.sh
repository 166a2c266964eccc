#!/usr/bin/env bash
# Build the one-folder desktop bundle dist/model-studio/ (PyInstaller, packaging/model-studio.spec) and
# smoke-test it: `inspect builtin:minilm --json`, `screenshots` offscreen, and small pipeline runs through
# the frozen worker (`model-studio __worker__`).
#
#   .venv/bin/pip install -e '.[package]'     # PyInstaller
#   packaging/build.sh                         # build (~6 min on 2 cores) + smoke test (~2 min)
#   packaging/build.sh --smoke-only            # smoke-test an existing dist/model-studio
#
# Environment: PYTHON (default .venv/bin/python). Outputs: build/ (work files), dist/model-studio/ (the bundle).
#
# Installing the bundle for one user (menu entry and icon):
#   cp -r dist/model-studio ~/.local/opt/ && ln -s ~/.local/opt/model-studio/model-studio ~/.local/bin/
#   cp packaging/model-studio.desktop ~/.local/share/applications/
#   for n in 16 32 48 64 128 256 512; do install -D resources/icons/model-studio-$n.png \
#     ~/.local/share/icons/hicolor/${n}x${n}/apps/model-studio.png; done
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BUNDLE=$ROOT/dist/model-studio
EXE=$BUNDLE/model-studio

if [ "${1:-}" != "--smoke-only" ]; then
  if ! "$PYTHON" -m PyInstaller --version >/dev/null 2>&1; then
    echo "build.sh: PyInstaller is missing: $PYTHON -m pip install -e '.[package]'" >&2
    exit 1
  fi
  echo "== building with PyInstaller $("$PYTHON" -m PyInstaller --version)"
  start=$(date +%s)
  "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$ROOT/dist" --workpath "$ROOT/build" packaging/model-studio.spec
  echo "== build time: $(( $(date +%s) - start )) s"
fi

[ -x "$EXE" ] || { echo "build.sh: no bundle at $EXE" >&2; exit 1; }
echo "== bundle size: $(du -sh "$BUNDLE" | cut -f1) ($BUNDLE)"
# (the studio's own tensorrt.py technique module is expected; the TensorRT packages and libraries are not)
if find "$BUNDLE/_internal" -maxdepth 1 \( -iname 'tensorrt*' -o -iname 'polygraphy*' -o -iname 'libnvinfer*' \) | grep -q .; then
  echo "build.sh: TensorRT/polygraphy ended up in the bundle" >&2
  exit 1
fi

SMOKE=$(mktemp -d)
trap 'rm -rf "$SMOKE"' EXIT
export QT_QPA_PLATFORM=offscreen MODEL_STUDIO_HOME="$SMOKE/home"
cd "$SMOKE"  # nothing from the source tree may leak in

echo "== smoke: inspect builtin:minilm --json"
"$EXE" inspect builtin:minilm --json > inspect.json
"$PYTHON" - inspect.json <<'PY'
import json, sys
model = json.load(open(sys.argv[1]))["model"]
assert model["parameters"] == 22_713_728, model["parameters"]
print(f"   {model['architecture']}: {model['parameters']:,} parameters, {model['tensors']} tensors")
PY

echo "== smoke: screenshots"
SHOTS=${SHOTS_DIR:-$SMOKE/shots}
"$EXE" screenshots "$SHOTS"
count=$(find "$SHOTS" -name '*.png' -size +1k | wc -l)
[ "$count" -ge 3 ] || { echo "build.sh: only $count screenshots in $SHOTS" >&2; exit 1; }
echo "   $count PNG files"

echo "== smoke: run (no steps: the frozen worker evaluates the original)"
cat > empty.yaml <<'YAML'
version: 1
model: builtin:minilm
data: {evaluation_examples: 4, calibration_examples: 4}
steps: []
evaluate: {latency: false, sequence_length: 16}
YAML
"$EXE" run empty.yaml --json --workspace "$SMOKE/ws" > run-empty.json

echo "== smoke: run (export.onnx, onnx.optimize, onnx.quantize_dynamic)"
cat > onnx.yaml <<'YAML'
version: 1
model: builtin:minilm
data: {evaluation_examples: 4, calibration_examples: 4}
steps:
  - technique: export.onnx
  - technique: onnx.optimize
  - technique: onnx.quantize_dynamic
evaluate: {latency: false, sequence_length: 16}
YAML
"$EXE" run onnx.yaml --json --workspace "$SMOKE/ws" > run-onnx.json

echo "== smoke: run (export.onnx with the dynamo exporter: onnxscript reads its own source at run time)"
cat > dynamo.yaml <<'YAML'
version: 1
model: builtin:minilm
data: {evaluation_examples: 4, calibration_examples: 4}
steps:
  - technique: export.onnx
    params: {exporter: dynamo, opset: 18}
evaluate: {latency: false, sequence_length: 16}
YAML
"$EXE" run dynamo.yaml --json --workspace "$SMOKE/ws" > run-dynamo.json
"$PYTHON" - run-empty.json run-onnx.json run-dynamo.json <<'PY'
import json, sys
checks = ((sys.argv[1], "torch", 0.9999), (sys.argv[2], "onnx", 0.98), (sys.argv[3], "onnx", 0.9999))
for path, kind, floor in checks:
    variant = json.load(open(path))["variants"][-1]
    cosine = variant["metrics"]["quality"]["fidelity_cosine"]
    assert variant["kind"] == kind and cosine >= floor, (path, variant["kind"], cosine)
    print(f"   {kind} variant {variant['id']}: {variant['metrics']['size_bytes']:,} bytes, fidelity {cosine:.4f}")
PY
echo "== smoke test passed"
