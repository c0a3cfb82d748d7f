#!/usr/bin/env bash
# Builds the example plugins (src/*.c) into modules/*.wasm with Debian's
# clang and lld (apt-get install clang lld): wasm32, no libc, no WASI.
set -euo pipefail
cd "$(dirname "$0")"
for src in src/*.c; do
    name=$(basename "$src" .c)
    clang --target=wasm32-unknown-unknown -O2 -nostdlib -ffreestanding \
        -Wall -Wextra -Werror -Wl,--no-entry -Wl,--strip-all \
        -o "modules/$name.wasm" "$src"
    echo "modules/$name.wasm ($(stat -c %s "modules/$name.wasm") bytes)"
done
