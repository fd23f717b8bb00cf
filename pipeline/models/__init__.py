"""Model factories: CLIP students (open_clip), diffusion teachers (diffusers), the map h_w."""
