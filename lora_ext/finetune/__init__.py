"""lora-ext train: fine-tune one adapter per dataset in one run over a frozen base model."""
