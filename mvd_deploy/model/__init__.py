"""The MobileVD train-time model, built on diffusers' SVD UNet."""
