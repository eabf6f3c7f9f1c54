"""The end-to-end benchmark behind `lora-ext bench`, and what the other benchmarks share with it.

    main.py           the command: arguments, then setup, check, scenarios, timing, report in turn
    workload.py       the model, prompts and adapters; patched and PEFT models built from them
    check.py          greedy tokens of lora_ext against PEFT's, before any timing
    scenarios.py      the ways of serving the batch that are timed (the Scenario dataclass)
    fused_gemm.py     the fused base GEMM alone in the model; which kernel paths a step takes
    runners.py        prefill and decode of one scenario, the interleaved timed rounds
    figures.py        rows (medians, overheads, floors) and the summary of the targets
    report.py         the table, bench.json, bench.txt, bench.png
    measure.py        timers, memory bandwidth, machine description (also benchmarks/*.py)
    distributions.py  adapter distributions over a batch (also tests/ and benchmarks/bench_kernels.py)
    synthetic.py      the built-in model and synthetic PEFT adapters
"""
