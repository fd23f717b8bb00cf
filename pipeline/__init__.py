"""SDS-CLIP: CLIP fine-tuned with score distillation from a text-to-image diffusion teacher."""
