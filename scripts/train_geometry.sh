#!/usr/bin/env bash
# Train the learned-routing model at Qwen3-VL-30B-A3B's routing geometry (`--preset geometry`, docs/affinity.md)
# on a GPU, in pieces of at most PIECE_MIN minutes each, so that a machine lent for short calls can run it.
#
#   scripts/train_geometry.sh start [ARGS]    # a new run in OUT_DIR: the first piece (refused over a run: --force)
#   scripts/train_geometry.sh more            # the next piece (--resume) of the run in OUT_DIR
#   scripts/train_geometry.sh pack DEST       # the bf16 checkpoint, log and summary as one tarball cut in 15 MB parts
#
# OUT_DIR (default /tmp/geo) holds the run; PIECE_MIN (default 9) is each piece's wall-clock budget; SCHEDULE_MIN
# (default 40) is the LR schedule's length over all pieces together (`--schedule-minutes`); VISION (default: the
# shipped model) is where the vision tower and tokenizer come from (`--init-vision`). ARGS go to the trainer (e.g.
# --aux-where 1 --visual-dropout 0.3, as the shipped model's stage 2 used). Each piece ends with a val eval and
# the bf16 checkpoint in OUT_DIR; `pack` puts them where a size limit per file applies (cat DEST/geo.tar.part-* |
# tar x to rebuild).
set -euo pipefail
py=${PYTHON:-python3}
out=${OUT_DIR:-/tmp/geo}
piece=${PIECE_MIN:-9}
schedule=${SCHEDULE_MIN:-40}
vision=${VISION:-src/vismmoe/checkpoints/vqa-moe}
[ $# -ge 1 ] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
fail() { echo "train_geometry.sh: error: $1" >&2; exit 2; }
minutes() { [[ $2 =~ ^[0-9]+([.][0-9]+)?$ && $2 =~ [1-9] ]] || fail "$1=$2 is not a number of minutes above 0"; }
minutes PIECE_MIN "$piece"
minutes SCHEDULE_MIN "$schedule"
cmd=$1; shift
case $cmd in
    start) "$py" -m vismmoe.tools.train --preset geometry --init-vision "$vision" --out "$out" --minutes "$piece" \
               --schedule-minutes "$schedule" --no-progress "$@" ;;
    more)  "$py" -m vismmoe.tools.train --out "$out" --resume --minutes "$piece" --no-progress "$@" ;;
    pack)  [ $# -eq 1 ] || fail "pack takes one folder, DEST: scripts/train_geometry.sh pack DEST"
           dest=$1
           [ -f "$out/config.json" ] || fail "OUT_DIR=$out holds no finished piece (no config.json): run start first"
           ! compgen -G "$dest/geo.tar.part-*" >/dev/null ||       # stale parts would join the new ones in cat
               fail "$dest already holds geo.tar.part-* files: give a new or empty DEST, or remove them"
           [ ! -e "$dest" ] || [ -d "$dest" ] || fail "DEST $dest is a file, not a folder"
           mkdir -p "$dest"
           tar -C "$out" -cf - --exclude train_state.pt . | split -b 15000000 - "$dest/geo.tar.part-"
           ls -l "$dest" ;;
    *) fail "unknown command $cmd: start, more or pack" ;;
esac
