#!/usr/bin/env bash
# Installs the build tree into a temp prefix, checks the layout, then builds
# and runs a consumer project against it twice: with find_package(KeyMesh)
# and with pkg-config. Usage: install_test.sh BUILD_DIR CONSUMER_SRC
set -euo pipefail
build=$1
consumer=$2
tmp=$(mktemp -d /tmp/keymesh-install-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

fail() { echo "install_test: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" || { cat "$tmp/install.log"; fail "cmake --install failed"; }

for f in bin/keymesh-broker bin/keymeshctl lib/libkeymesh.so lib/pkgconfig/keymesh.pc \
         lib/cmake/KeyMesh/KeyMeshConfig.cmake lib/cmake/KeyMesh/KeyMeshConfigVersion.cmake \
         lib/cmake/KeyMesh/KeyMeshTargets.cmake lib/systemd/system/keymesh-broker.service \
         share/keymesh/keymesh.example.json share/keymesh/python/keymesh/__init__.py; do
  [ -e "$prefix/$f" ] || fail "missing $f"
done
[ -x "$prefix/bin/keymesh-broker" ] && [ -x "$prefix/bin/keymeshctl" ] || fail "binaries not executable"
# The Python package there: its extension, stub and marker, and it imports
# against the installed library (from outside the checkout).
if [ -e "$build/python/keymesh" ]; then
  ls "$prefix"/share/keymesh/python/keymesh/_native*.so >/dev/null 2>&1 || fail "keymesh._native not installed"
  for f in _native.pyi py.typed; do
    [ -e "$prefix/share/keymesh/python/keymesh/$f" ] || fail "missing share/keymesh/python/keymesh/$f"
  done
  (cd "$tmp" && env -u PYTHONPATH PYTHONPATH="$prefix/share/keymesh/python" KEYMESH_LIB="$prefix/lib/libkeymesh.so" \
    PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -c \
    'import keymesh; p = keymesh.SyncKeyPool(["sk-install-aaaaaaaaaaaa"]); p.release(p.acquire()); p.close()') \
    || fail "the installed Python package does not work"
fi
# The soname link chain: libkeymesh.so -> libkeymesh.so.0 -> libkeymesh.so.0.1.0
soname=$(objdump -p "$prefix/lib/libkeymesh.so" | awk '/SONAME/ {print $2}')
[ -n "$soname" ] && [ -e "$prefix/lib/$soname" ] || fail "soname link $soname missing"
# Only the public headers.
headers=$(cd "$prefix/include/keymesh" && ls | sort | tr '\n' ' ')
expected="export.h keymesh.h pool.h rate_limit_headers.h selector.h status.h types.h "
[ "$headers" = "$expected" ] || fail "installed headers: $headers (expected $expected)"
[ ! -e "$prefix/include/shm" ] && [ ! -e "$prefix/include/broker" ] || fail "private headers installed"
# The unit points at the installed broker.
grep -q "ExecStart=$prefix/bin/keymesh-broker " "$prefix/lib/systemd/system/keymesh-broker.service" \
  || fail "the unit does not run $prefix/bin/keymesh-broker"
grep -q "^prefix=$prefix\$" "$prefix/lib/pkgconfig/keymesh.pc" || fail "keymesh.pc has the wrong prefix"
"$prefix/bin/keymesh-broker" --help >/dev/null || fail "installed broker does not run"
"$prefix/bin/keymesh-broker" --check --config "$prefix/share/keymesh/keymesh.example.json" 2>"$tmp/check.err" && true
grep -q "config:" "$tmp/check.err" || fail "the example config check gave no config message"

run_consumer() {
  local name=$1; shift
  cmake -S "$consumer" -B "$tmp/$name" -DCMAKE_BUILD_TYPE=Release "$@" >"$tmp/$name.log" 2>&1 \
    || { cat "$tmp/$name.log"; fail "$name: configure failed"; }
  cmake --build "$tmp/$name" -j2 >>"$tmp/$name.log" 2>&1 || { cat "$tmp/$name.log"; fail "$name: build failed"; }
  for exe in consumer_cpp consumer_c; do
    out=$(LD_LIBRARY_PATH="$prefix/lib" "$tmp/$name/$exe") || fail "$name/$exe failed: $out"
    case "$out" in *" ok "*) ;; *) fail "$name/$exe printed: $out" ;; esac
    echo "$name/$exe: $out"
  done
}
run_consumer find_package -DCMAKE_PREFIX_PATH="$prefix"
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" run_consumer pkg_config -DUSE_PKG_CONFIG=ON
echo "install_test: ok"
