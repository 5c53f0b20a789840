"""Single-device building blocks (nn.Module and tensor helpers) that zoo entries compose."""
