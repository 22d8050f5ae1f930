#!/bin/bash
# The vision tower's attention as a kernel class of its own (vision_attention.patch, beside this file) against the
# code without it, taking turns on the idle 2-core CPU, the default calibration sizes. From the repo root:
#   git worktree add /tmp/va HEAD && git -C /tmp/va apply $PWD/docs/results/profiles/vision_attention_ab_cpu_2026-12-08/vision_attention.patch
#   bash docs/results/profiles/vision_attention_ab_cpu_2026-12-08/run.sh OUT
out=${1:?OUT}
for i in 1 2; do
  for side in new old; do
    if [ $side = new ]; then src=/tmp/va/src; else src=$PWD/src; fi
    PYTHONPATH=$src timeout 900 python -m vismmoe.bench.profiles --validate --profile cpu-local --new-tokens 16 \
      --date 2026-12-08 --out $out/${side}_$i > $out/${side}_$i.log 2>&1
  done
done
