#!/bin/bash
# Prepare the repro's prose corpus (as `dsmoe repro` does) and train configs/repro/ds-moe.yaml, resumably: run it
# again after an interruption and it goes on from the newest checkpoint. One thread, for a shared machine.
set -e
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY=${PYTHON:-python}
$PY -c "from pathlib import Path; from dsmoe.evaluation.repro import ensure_corpus; ensure_corpus(Path('runs/data/prose'), 'prose', 8192)"
$PY -m dsmoe train --config configs/repro/ds-moe.yaml out_dir=runs/repro/ds-moe data=runs/data/prose --resume
