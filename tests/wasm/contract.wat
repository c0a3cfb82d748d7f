;; The tests' plugin: one export per behaviour the WASM node contract names.
;; Written against the Extism kernel directly (module "extism:host/env").
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "input_load_u64" (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "load_u8" (func $load_u8 (param i64) (result i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "greeting")
  (data (i32.const 16) "failing on purpose")
  (global $count (mut i64) (i64.const 0))

  ;; n bytes of plugin memory at $at as a new kernel block
  (func $to_kernel (param $at i32) (param $n i64) (result i64)
    (local $k i64) (local $i i64)
    (local.set $k (call $alloc (local.get $n)))
    (block $done (loop $l
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (call $store_u8 (i64.add (local.get $k) (local.get $i))
        (i32.load8_u (i32.add (local.get $at) (i32.wrap_i64 (local.get $i)))))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $l)))
    (local.get $k))

  ;; the first n bytes of the input as a new kernel block
  (func $copy_input (param $n i64) (result i64)
    (local $k i64) (local $i i64)
    (local.set $k (call $alloc (local.get $n)))
    (block $done (loop $l
      (br_if $done (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (local.get $n)))
      (call $store_u64 (i64.add (local.get $k) (local.get $i)) (call $input_load_u64 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 8)))
      (br $l)))
    (block $done (loop $l
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (call $store_u8 (i64.add (local.get $k) (local.get $i)) (call $input_load_u8 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $l)))
    (local.get $k))

  (func $emit_input (param $n i64)
    (call $output_set (call $copy_input (local.get $n)) (local.get $n)))

  ;; the payload back, unchanged
  (func (export "echo") (result i32)
    (call $emit_input (call $input_length)) (i32.const 0))

  ;; ASCII letters upper-cased (text in, text out)
  (func (export "upper") (result i32)
    (local $n i64) (local $k i64) (local $i i64) (local $c i32)
    (local.set $n (call $input_length))
    (local.set $k (call $alloc (local.get $n)))
    (block $done (loop $l
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (local.set $c (call $input_load_u8 (local.get $i)))
      (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
        (then (local.set $c (i32.sub (local.get $c) (i32.const 32)))))
      (call $store_u8 (i64.add (local.get $k) (local.get $i)) (local.get $c))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $l)))
    (call $output_set (local.get $k) (local.get $n))
    (i32.const 0))

  ;; one byte short: never a whole number of float32 frames
  (func (export "odd") (result i32)
    (call $emit_input (i64.sub (call $input_length) (i64.const 1))) (i32.const 0))

  ;; the first half
  (func (export "half") (result i32)
    (call $emit_input (i64.div_u (call $input_length) (i64.const 2))) (i32.const 0))

  ;; no output: no frame
  (func (export "empty") (result i32) (i32.const 0))

  ;; the config value "greeting"
  (func (export "greeting") (result i32)
    (local $v i64)
    (local.set $v (call $config_get (call $to_kernel (i32.const 0) (i64.const 8))))
    (if (i64.eqz (local.get $v)) (then (return (i32.const 0))))
    (call $output_set (local.get $v) (call $length (local.get $v)))
    (i32.const 0))

  ;; frames seen by this instance, as 8 bytes little-endian (state across calls)
  (func (export "count") (result i32)
    (local $k i64)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (local.set $k (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $k) (global.get $count))
    (call $output_set (local.get $k) (i64.const 8))
    (i32.const 0))

  ;; never returns
  (func (export "spin") (result i32) (loop $l (br $l)) (i32.const 0))

  ;; a trap
  (func (export "trap") (result i32) unreachable)

  ;; the plugin's own error (error_set)
  (func (export "fail") (result i32)
    (call $error_set (call $to_kernel (i32.const 16) (i64.const 18))) (i32.const 1))

  ;; grows its memory until refused
  (func (export "bomb") (result i32)
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable)
)
