"""The demos and their tiny-model builder, not the runtime: `python -m sftkit demo`, `demo-real`, `build-demo-model`."""
