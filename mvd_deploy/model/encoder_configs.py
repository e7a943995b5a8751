"""SVD's conditioning encoders', TAESD's decoder's architectures and CLIP's normalisation.

No heavy imports: recipes read them."""

from __future__ import annotations

from typing import Any

# stabilityai/stable-video-diffusion-img2vid(-xt) image_encoder/config.json: OpenCLIP ViT-H/14.
SVD_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
}
# ... vae/config.json (AutoencoderKLTemporalDecoder); the decoder keys are kept for the record.
SVD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
# madebyollin/taesd (diffusers' AutoencoderTiny defaults): the deployed decoder's architecture, which a
# recipe's ``decoder`` section may narrow (the tiny recipe: the suite decodes every video it makes).
TAESD_DECODER: dict[str, Any] = {"decoder_block_out_channels": [64, 64, 64, 64], "num_decoder_blocks": [3, 3, 3, 1]}
# feature_extractor/preprocessor_config.json: OpenAI CLIP's normalisation.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
