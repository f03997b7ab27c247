#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only) for the end-to-end tests in tests/test_llamacpp.py.
#
# No Debian package ships llama.cpp and PyPI has no wheel of it, but the source
# distribution of `llama-cpp-python` vendors the whole llama.cpp tree (tools/server too).
# We fetch that sdist with pip, unpack only vendor/llama.cpp and build just the server,
# statically linked, into a cache directory outside the repository:
#
#   ${FAILOVER_PROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/failover-proxy}/llama-<version>/bin/llama-server
#
# once per version (10 to 15 minutes on 2 cores); later runs find the binary and return at
# once. A lock file serialises concurrent builds (a second run waits, then reuses the
# first's binary). The work tree ($CACHE/.llama-<version>.work) survives an interrupted or
# failed build so the next run resumes the compile; the result is staged in a temporary
# directory and renamed into place, so a half-built tree is never taken for a finished one.
#
# Prints the path of the binary on its last line of stdout. `--path` prints where the binary
# is (or would be) and `--cache` the cache directory, without building anything.
#
# Environment: LLAMA_CPP_PYTHON_VERSION (0.3.36), PYTHON (the venv's, else python3),
# LLAMA_SDIST (an already downloaded sdist, skips pip), JOBS (nproc),
# FAILOVER_PROXY_CACHE (the cache directory).
set -euo pipefail

# Everything is in a function, so bash parses the whole file before running any of it: an
# edit to this file during a (long) build cannot derail the build that is running.
main() {

  VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  CACHE="${FAILOVER_PROXY_CACHE:-${XDG_CACHE_HOME:-${HOME:-$(cd ~ && pwd)}/.cache}/failover-proxy}"
  DEST="$CACHE/llama-$VERSION"
  BIN="$DEST/bin/llama-server"
  JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
  fi

  log() { echo "build_llama_server: $*" >&2; }

  case "${1:-}" in
    --path) echo "$BIN"; exit 0 ;;          # where the binary is (or will be); builds nothing
    --cache) echo "$CACHE"; exit 0 ;;       # the cache directory
    "") ;;
    *) log "usage: $0 [--path | --cache]"; exit 2 ;;
  esac

  usable() { [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; }

  if usable; then
    log "reusing $BIN"
    echo "$BIN"
    exit 0
  fi

  for tool in cmake c++ tar flock; do
    command -v "$tool" >/dev/null 2>&1 || { log "needs '$tool' (apt-get install cmake g++)"; exit 1; }
  done

  mkdir -p "$CACHE"
  exec 9>"$CACHE/llama-$VERSION.lock"
  if ! flock -n 9; then
    log "another build of llama-server $VERSION is running; waiting for it"
    flock 9
  fi
  # Whoever held the lock may have finished the job.
  if usable; then
    log "reusing $BIN (built by a concurrent run)"
    echo "$BIN"
    exit 0
  fi

  # The work tree survives a failed or interrupted build (we hold the lock, so it is ours),
  # so running again resumes the compile; it is removed once the binary is in place.
  WORK="$CACHE/.llama-$VERSION.work"
  started=$(date +%s)
  resumed=0

  if [ ! -f "$WORK/src/.unpacked" ]; then
    rm -rf "$WORK"
    mkdir -p "$WORK/src"
    if [ -n "${LLAMA_SDIST:-}" ]; then
      SDIST="$LLAMA_SDIST"
    else
      log "downloading the llama-cpp-python $VERSION sdist (it vendors llama.cpp)"
      "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$WORK/dl" >&2
      SDIST="$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz)"
    fi
    log "unpacking vendor/llama.cpp"
    tar -xzf "$SDIST" -C "$WORK/src" --strip-components=3 \
      "llama_cpp_python-$VERSION/vendor/llama.cpp"
    [ -f "$WORK/src/tools/server/CMakeLists.txt" ] || { log "no tools/server in the sdist"; exit 1; }
    rm -rf "$WORK/dl"
    touch "$WORK/src/.unpacked"
  else
    log "resuming the build in $WORK"
    resumed=1
  fi

  compile() {
    cmake -S "$WORK/src" -B "$WORK/build" \
      -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF \
      -DGGML_NATIVE=OFF \
      -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=ON >"$WORK/configure.log" 2>&1 \
      || { tail -40 "$WORK/configure.log" >&2; return 1; }
    log "building llama-server with $JOBS jobs (10 to 15 minutes on 2 cores)"
    cmake --build "$WORK/build" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 \
      || { tail -60 "$WORK/build.log" >&2; return 1; }
  }

  log "configuring (CPU only, static, no curl)"
  if ! compile; then
    if [ "$resumed" = 1 ]; then
      # A resumed tree can hold the debris of a killed compile: start it over once.
      log "the resumed build failed; building again from scratch"
      rm -rf "$WORK/build"
      compile || { log "build failed; logs in $WORK"; exit 1; }
    else
      log "build failed; logs in $WORK"
      exit 1
    fi
  fi

  built="$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -1)"
  [ -n "$built" ] || { log "the build produced no llama-server"; exit 1; }

  STAGE="$(mktemp -d "$CACHE/.llama-$VERSION.stage.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  chmod 755 "$STAGE"
  mkdir -p "$STAGE/bin"
  cp "$built" "$STAGE/bin/llama-server"
  "$STAGE/bin/llama-server" --version >"$STAGE/VERSION" 2>&1 || { cat "$STAGE/VERSION" >&2; exit 1; }
  echo "llama-cpp-python $VERSION; built in $(( $(date +%s) - started )) s" >>"$STAGE/VERSION"

  # A leftover directory without a working binary goes first; then one rename publishes it.
  rm -rf "$DEST"
  mv -T "$STAGE" "$DEST"
  rm -rf "$WORK"
  log "built $BIN in $(( $(date +%s) - started )) s"
  echo "$BIN"
}

main "$@"
