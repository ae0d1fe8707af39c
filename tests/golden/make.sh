#!/usr/bin/env bash
# Writes the golden data directory tests/golden/v1 with the stratad and
# strata binaries of this checkout (see README.md). Run it only to create a
# golden directory for a new format version (into a new directory): v1 must
# stay as it was written, since tests/tests/upgrade.rs checks that every
# later binary still serves it.
#
#   cargo build -p stratad -p strata-client --bins && tests/golden/make.sh [OUT]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${BIN:-$here/../../target/debug}
out=${1:-$here/v1}
[ -e "$out" ] && { echo "$out exists; choose a new directory (v1 is never rewritten)" >&2; exit 2; }
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/c.toml" <<TOML
[tiers.dram]
bytes = "8MiB"
prefault = false
[tiers.nvme]
bytes = "4MiB"
segment_bytes = "1MiB"
write_through = true
TOML
"$bin/stratad" --config "$work/c.toml" --data-dir "$work/data" --listen "127.0.0.1:$port" \
  --uds off --metrics-listen off 2>"$work/log" &
pid=$!
s() { "$bin/strata" --endpoint "http://127.0.0.1:$port" "$@"; }
for _ in $(seq 200); do s stats >/dev/null 2>&1 && break; sleep 0.05; done

# Block b of length n: byte j is (7j + 31b + j/256) mod 256 (upgrade.rs has the same).
payload() { python3 -c "import sys; b,n=int(sys.argv[1]),int(sys.argv[2]); sys.stdout.buffer.write(bytes((7*j+31*b+(j>>8))&255 for j in range(n)))" "$1" "$2" > "$work/p"; }
put() { # ns key parent b n
  payload "$4" "$5"
  if [ -n "$3" ]; then s put --namespace "$1" --key "$2" --parent "$3" "$work/p"; else s put --namespace "$1" --key "$2" "$work/p"; fi
}
# A: f16, 2 layers, 2 KV heads, head dim 16, 16 tokens per block: 4096-byte blocks.
A=$(s layout register --model golden/a --dtype f16 --layers 2 --kv-heads 2 --head-dim 16 --block-tokens 16)
# B: bf16, 1 layer, 1 KV head, head dim 32, 8 tokens per block: 1024-byte blocks.
B=$(s layout register --model golden/b --dtype bf16 --layers 1 --kv-heads 1 --head-dim 32 --block-tokens 8)
# C: like B under another model id; evicted below.
C=$(s layout register --model golden/c --dtype bf16 --layers 1 --kv-heads 1 --head-dim 32 --block-tokens 8)
put "$A" a0 "" 0 4096
put "$A" a1 a0 1 4096
put "$A" a2 a1 2 4096
put "$A" a3 a2 3 2048         # a partial block: 8 of 16 tokens
put "$A" dead "" 9 4096
s delete --namespace "$A" dead  # a tombstone record
put "$B" b0 "" 4 1024
put "$B" b1 b0 5 1024
put "$C" c0 "" 6 1024
s evict --namespace "$C"      # an entry in evictions.v1
s drain
wait "$pid"

# Keep the segment up to its last record: the rest is fallocated zeros,
# which the daemon reads up to the file's size.
mkdir -p "$out/nvme"
for f in "$work"/data/nvme/*; do
  name=$(basename "$f")
  case "$name" in
    seg-*.strata)
      python3 - "$f" "$out/nvme/$name" <<'PY'
import sys
d = open(sys.argv[1], 'rb').read()
end = len(d.rstrip(b'\0'))
end = (end + 4095) // 4096 * 4096
open(sys.argv[2], 'wb').write(d[:end])
PY
      ;;
    *) cp "$f" "$out/nvme/$name" ;;
  esac
done
echo "namespaces: A=$A B=$B C=$C"
ls -l "$out/nvme"
