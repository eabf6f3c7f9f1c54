"""The benchmark's built-in model and synthetic adapters, saved as real PEFT directories."""

import os

import torch

from lora_ext import atomic

# Llama architecture, random weights, small enough for a full `lora-ext bench` to run in minutes on
# a 2-core CPU (its run time is in benchmarks/NOTES.md). Every linear layer of every block gets
# adapters ("all-linear").
DEFAULT_MODEL_CONFIG = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                            num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                            tie_word_embeddings=False)


def build_default_model(dtype, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**DEFAULT_MODEL_CONFIG))
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def load_local_model(path, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id or 0
    return model.to(device).eval()


def linear_modules(model):
    """(name, d_in, d_out) of every linear layer but the output head."""
    head = model.get_output_embeddings()
    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head]


def write_peft_adapter(directory, modules, rank, alpha, seed, extend=None):
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) with random A and B.
    extend(tensors, config): adds to both (DoRA magnitudes, module copies, ...) before they are written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, d_in, d_out in modules:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) / rank ** 0.5
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                  target_modules=sorted({n.rsplit(".", 1)[-1] for n, _, _ in modules}), lora_dropout=0.0,
                  bias="none", use_rslora=False, use_dora=False, modules_to_save=None, base_model_name_or_path=None)
    if extend is not None:
        extend(tensors, config)
    os.makedirs(directory, exist_ok=True)
    with atomic.atomic_path(os.path.join(directory, "adapter_model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic.write_json(os.path.join(directory, "adapter_config.json"), config, indent=1)
    return directory


def make_adapters(model, root, count, ranks, prefix="adapter"):
    """`count` synthetic adapters on every linear layer, ranks cycling through `ranks`."""
    modules = linear_modules(model)
    return {f"{prefix}{i}": write_peft_adapter(os.path.join(root, f"{prefix}{i}"), modules, ranks[i % len(ranks)],
                                               None, seed=1000 + i)
            for i in range(count)}
