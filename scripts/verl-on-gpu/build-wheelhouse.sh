#!/usr/bin/env bash
# Builds a ready-to-unpack verl 0.9.1 + Ray install for the GPU machines (Python 3.12; torch 2.11 and most of
# the scientific stack already in the image; SGLang's own wheelhouse unpacked beside it at /tmp/sglang-site),
# split into xz chunks of at most 40 MB so each fits one device call next to the working tree.
# Usage (from the repository root): scripts/verl-on-gpu/build-wheelhouse.sh [OUTDIR, default .verl-wheelhouse]
set -euo pipefail
out="${1:-.verl-wheelhouse}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
# What `pip install -e '.[verl]'` resolves (pyproject's verl extra: verl, Ray with its [default] extras,
# TransferQueue, cachetools), less what the GPU image has (device notes, "Python packages already there")
# and what SGLang's wheelhouse carries (fastapi, uvicorn, pydantic, click, jsonschema, dill, pyzmq, msgspec,
# transformers 5.12.1). Not carried: wandb (verl imports it only for logger=wandb), torch and CUDA libraries.
# Pinned to the versions the verl tests pass with on CPU.
pkgs=(verl==0.9.1 ray==2.60.0 tensordict==0.10.0 pyvers==0.1.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
      torchdata==0.11.0 TransferQueue==0.1.11 hydra-core==1.3.8 omegaconf==2.3.1
      codetiming==1.4.0 datasets==5.2.0 multiprocess==0.70.19 cachetools==8.0.2 pylatexenc==2.11
      aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0
      google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1_modules==0.4.2
      cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 py-spy==0.4.3 smart_open==9.0.2 virtualenv==21.14.5
      distlib==0.4.4 platformdirs==4.14.9 python-discovery==1.9.6
      opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
      opentelemetry-proto==1.45.2 opentelemetry-exporter-prometheus==0.66b2
      opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
      opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2)
# Published as source only, and pure Python: built into a wheel here.
sdists=(antlr4-python3-runtime==4.9.3)
mkdir -p "$work/wheels" "$work/site"
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/wheels" "$p" 2>&1 | grep -v "WARNING: Location" || true
done
for p in "${sdists[@]}"; do
  python3 -m pip wheel -q --no-deps -w "$work/wheels" "$p" 2>&1 | grep -v "WARNING: Location" || true
done
found=$(ls "$work"/wheels/*.whl | wc -l)
want=$(( ${#pkgs[@]} + ${#sdists[@]} ))
[ "$found" -eq "$want" ] || { echo "have $found wheels for $want packages" >&2; exit 1; }
python3 -m pip install -q --no-deps --no-compile --target "$work/site" "${plat[@]}" "$work"/wheels/*.whl 2>&1 | grep -v "WARNING" || true
# Parts of Ray verl never loads: Java workers (ray/jars), the dashboard's browser bundle (its Python backend
# stays), RLlib. About 45 MB unpacked.
rm -rf "$work/site/ray/jars" "$work/site/ray/dashboard/client/build" "$work/site/ray/rllib"
# verl's and TransferQueue's wheels also install their own repositories' top-level tests/, scripts/, recipe/ and
# tutorial/ packages, which nothing imports at run time; on PYTHONPATH they would shadow a checkout's folders.
rm -rf "$work/site/tests" "$work/site/scripts" "$work/site/recipe" "$work/site/tutorial"
find "$work/site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$out"
rm -f "$out"/part.*
tar -cf - -C "$work/site" . | xz -T0 -6 | split -b 40M - "$out/part."
ls -la "$out"
