"""Tiny transformers models built from configs (no download) and PEFT adapters saved from them."""

import torch

ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2"]


def build_model(arch, dtype=torch.float32, seed=0, **overrides):
    """overrides: config fields of the Llama-like models (for example num_key_value_heads=4, so
    that 4 tensor-parallel ranks each get a whole key/value head)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))  # q/k/v carry a bias
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                                                    eos_token_id=2))
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def adapter_configs(arch):
    """Three adapters of different ranks, targets, rank/alpha patterns and rsLoRA."""
    if arch == "gpt2":
        targets = (["c_attn"], ["c_attn", "c_proj", "c_fc"], ["mlp.c_proj", "c_fc"])
        patterns = ({"c_fc": 3}, {"attn.c_proj": 5.0})
    else:
        targets = (["q_proj", "v_proj"], "all-linear", ["k_proj", "up_proj", "down_proj"])
        patterns = ({"down_proj": 3}, {"o_proj": 5.0})
    return {
        "sql": dict(r=8, lora_alpha=16, target_modules=targets[0]),
        "chat": dict(r=4, lora_alpha=8, target_modules=targets[1], rank_pattern=patterns[0],
                     alpha_pattern=patterns[1]),
        "code": dict(r=16, lora_alpha=4, use_rslora=True, target_modules=targets[2], layers_to_transform=[1]),
    }


def save_adapter(arch, directory, seed=1, model_overrides=None, **config):
    """Saves a PEFT adapter with random (non-zero) A and B for `arch` into `directory` (and, with
    use_dora, magnitudes scaled away from the norm PEFT initialises them to; with lora_bias, a
    random lora_B bias; with modules_to_save, copies that differ from the base modules)."""
    from peft import LoraConfig, get_peft_model

    base = build_model(arch, **(model_overrides or {}))
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # PEFT's random init makes deltas tiny next to the base output; widen them
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
            if "modules_to_save" in name:  # a fully trained copy: make it differ from the base module
                param.add_(torch.randn_like(param) * param.std())
    peft_model.save_pretrained(directory)
    return directory


def save_all_adapters(arch, root, model_overrides=None):
    paths = {}
    for i, (name, config) in enumerate(adapter_configs(arch).items()):
        paths[name] = save_adapter(arch, str(root / name), seed=10 + i, model_overrides=model_overrides, **config)
    return paths
