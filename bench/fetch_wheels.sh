#!/usr/bin/env bash
# Fetch the benchmark's peers (Liger-Kernel, Cut Cross-Entropy, QuACK + CUTLASS DSL) as pinned
# wheels for the GPU machine (x86_64, CPython 3.12, torch 2.11, CUDA 13, no network there).
# Run here, on a CPU machine with network, from anywhere in the checkout:
#   bash bench/fetch_wheels.sh            # QUACK=0 skips QuACK and its 87 MiB CUTLASS libs
# Result, at the repo root (both folders git-ignored through .git/info/exclude):
#   .whl/   every wheel, plus part 0 of any wheel over SPLIT_MIB, and install.sh
#   .whl2/  the remaining parts (only QuACK's nvidia-cutlass-dsl-libs-* wheel is that big)
# The working tree that travels to the GPU machine is capped at 64 MiB, so each folder must
# stay under MAX_MIB. On the GPU machine:
#   one call (no QuACK):  carry [".whl"];  eval "$(bash .whl/install.sh)"
#   QuACK needs two calls on the same warm machine (it is given back ~30 s after a call):
#     call 1: carry [".whl"];  bash .whl/install.sh >/dev/null   (installs, stashes part 0)
#     call 2: carry [".whl2"]; eval "$(bash .whl2/install.sh)"   (joins, checks sha256, installs)
set -euo pipefail

cd "$(dirname "$0")/.."                     # repo root (this script lives in bench/)
QUACK=${QUACK:-1}
FLAVOR=${CUTLASS_FLAVOR:-cu12}              # cu12 is nvidia-cutlass-dsl's default; cu13 is as big
SPLIT_MIB=${SPLIT_MIB:-40}
MAX_MIB=${MAX_MIB:-60}

PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
if [ "$QUACK" = 1 ]; then
  # quack-kernels needs the CUTLASS DSL (meta wheel + base/core/toolkit-flavor libs), TVM-FFI
  # and torch-c-dlpack-ext; einops, protobuf, cuda-bindings, typing-extensions are in the image.
  PEERS+=(quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
          nvidia-cutlass-dsl-libs-core==4.8.1 "nvidia-cutlass-dsl-libs-$FLAVOR==4.8.1"
          apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
fi

# Keep the wheels out of git (only inside a git checkout).
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
  mkdir -p "$(dirname "$exclude")"
  for p in /.whl/ /.whl2/; do grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"; done
fi

rm -rf .whl .whl2 && mkdir -p .whl .whl2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PEERS[@]}"
[ "$(ls .whl/*.whl | wc -l)" -eq "${#PEERS[@]}" ] || { echo "expected ${#PEERS[@]} wheels" >&2; exit 1; }

# Split any wheel over SPLIT_MIB: part0 stays in .whl/, the rest go to .whl2/; NAME.sha256
# lets install.sh check the joined wheel.
for w in .whl/*.whl; do
  if [ "$(stat -c %s "$w")" -gt $((SPLIT_MIB * 1048576)) ]; then
    (cd .whl && sha256sum "${w#.whl/}" >"${w#.whl/}.sha256")
    split -b "${SPLIT_MIB}M" -d -a 1 "$w" "$w.part"
    rm "$w" && mv .whl/*.whl.part[1-9] .whl2/
  fi
done

# install.sh: run on the GPU machine. Stdout is only the export line (eval it); logs go to stderr.
cat >.whl/install.sh <<'EOS'
#!/usr/bin/env bash
# Install the carried peer wheels into $PEERS_SITE and print the `export PYTHONPATH=...`
# line, with the folders the installed *.pth files add (the CUTLASS DSL's `cutlass` package
# sits behind one, which a --target install never runs). The default path must contain
# /site-packages/: QuACK 0.6.5 fingerprints its GEMM epilogues and only treats code under a
# site-packages folder as library code; from /tmp/site, `import quack.linear_cross_entropy`
# fails (TypeError: epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'...>).
set -euo pipefail
shopt -s nullglob
site=${PEERS_SITE:-/tmp/site/site-packages}; stash=${PEERS_STASH:-/tmp/peer_wheels}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$stash"
# Stash what this call carried (.whl and/or .whl2): it outlives the call while the machine is warm.
for d in "$here" "$here/../.whl" "$here/../.whl2"; do
  [ -d "$d" ] || continue
  for f in "$d"/*.whl "$d"/*.part[0-9] "$d"/*.sha256; do cp -f "$f" "$stash/"; done
done
# Join split wheels whose parts are all here.
for s in "$stash"/*.whl.sha256; do
  w=${s%.sha256}; [ -f "$w" ] && continue
  parts=("$w".part[0-9]); [ ${#parts[@]} -gt 0 ] && cat "${parts[@]}" >"$w.tmp" || : >"$w.tmp"
  if [ "$(sha256sum <"$w.tmp" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$s")" ]; then mv "$w.tmp" "$w"; rm -f "$w".part[0-9]
  else rm -f "$w.tmp"; echo "install.sh: $(basename "$w") incomplete: carry .whl2 too (QuACK will not import)" >&2; fi
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" ${PEERS_PIP_ARGS:-} "$stash"/*.whl >&2
# The paths the *.pth files add (plain lines and `import` lines alike), as site.py would.
extra=$(python3 -S - "$site" <<'EOF'
import site, sys
before = list(sys.path); site.addsitedir(sys.argv[1])
print(":".join(p for p in sys.path if p not in before and p != sys.argv[1]))
EOF
)
line="export PYTHONPATH=$site${extra:+:$extra}\${PYTHONPATH:+:\$PYTHONPATH}"
echo "$line" >"$site/peers_env.sh"
echo "$line"
EOS
chmod +x .whl/install.sh
if compgen -G ".whl2/*.part*" >/dev/null; then cp .whl/install.sh .whl2/; dirs=(.whl .whl2); else rmdir .whl2; dirs=(.whl); fi

mib() { du -cb "$@" | tail -1 | awk '{printf "%.1f", $1 / 1048576}'; }
ls -l "${dirs[@]}" | grep -v '^total'
for d in "${dirs[@]}"; do echo "total $d: $(mib $d) MiB (limit $MAX_MIB MiB per carried folder)"; done
echo "total: $(mib "${dirs[@]}") MiB of wheels in ${#dirs[@]} folder(s)"
for d in "${dirs[@]}"; do
  awk -v a="$(mib $d)" -v m="$MAX_MIB" 'BEGIN { exit !(a > m) }' && { echo "$d over $MAX_MIB MiB" >&2; exit 1; }
done
exit 0
