"""What the CPU offers and which kernel paths each test configuration may take (the path names
are lora_ext.kernel_config.path_counts()'s)."""

ITEM_PATHS = ("cpu_items_avx512", "cpu_items_avx512_bf16", "cpu_items_portable")
LORA_PATHS = ITEM_PATHS + ("cpu_gemm_segments",)


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        return ""


CPU_FLAGS = set(_cpuinfo_field("flags").split())
HAS_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= CPU_FLAGS
HAS_AVX512_BF16 = HAS_AVX512 and "avx512_bf16" in CPU_FLAGS
HAS_AMX_BF16 = "amx_bf16" in CPU_FLAGS
HAS_AVX512_FP16 = "avx512_fp16" in CPU_FLAGS


# linear_lora's fused row limit for d_in <= 4096 by default (every dtype that fuses, every CPU).
FUSED_MAX_ROWS = 128

# CPU kernel configurations: the AVX-512 item kernel (default where the CPU has it; its bfloat16
# shrink uses AVX512-BF16 dot products where present), the same without those dot products, the
# portable kernel, and the GEMM path for every slot or for none.
CPU_CONFIGS = {
    "default": {},
    "no_dpbf16": {"cpu_avx512_bf16": False},
    "portable": {"cpu_isa": "portable"},
    "gemm_always": {"cpu_gemm_min_rows": 1, "cpu_backward_gemm_min_rows": 1},
    "gemm_never": {"cpu_gemm_min_rows": 1_000_000_000, "cpu_backward_gemm_min_rows": 1_000_000_000},
}

# config -> paths that must not run under it
FORBIDDEN = {
    "default": (),
    "no_dpbf16": ("cpu_items_avx512_bf16",),
    "portable": ("cpu_items_avx512", "cpu_items_avx512_bf16", "cpu_items_quad", "cpu_linear_fused"),
    "gemm_always": ITEM_PATHS,
    "gemm_never": ("cpu_gemm_segments",),
}


def assert_config_paths(config, taken):
    """The LoRA work done under `config` took only paths it allows: under "portable" every item
    ran on the portable kernels (slots with many rows may still take the GEMM path), and under
    "gemm_always" the GEMM path really ran whenever any LoRA work ran."""
    bad = sorted(p for p in FORBIDDEN[config] if p in taken)
    assert not bad, f"config {config!r} took paths {bad} it excludes (all taken: {taken})"
    if config == "gemm_always" and any(p in taken for p in LORA_PATHS):
        assert "cpu_gemm_segments" in taken, f"config 'gemm_always' should run cpu_gemm_segments, but took {taken}"
