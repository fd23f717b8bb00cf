"""The toy architectures at their smallest widths: what the unit tests build (in milliseconds)."""
from pipeline.config import StudentConfig, TeacherConfig

SIZE = 32  # image side in pixels
TEACHER = TeacherConfig(vae_channels=[8, 16], unet_channels=[16, 32], text_width=32, text_layers=1, text_heads=2)
STUDENT = StudentConfig(embed_dim=32, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                        text_layers=1, text_heads=2)
