"""GPU benchmarks of the image service, kept out of the shipped wheel (like diffusers' `benchmarks/`).

`sdxl-deploy bench-gpu` (`bench.run`) and `sdxl-deploy bench-unet` (`bench.unet`) run from a checkout of
the repository; `bench.launch` starts `sdxl-deploy serve` processes for them and for the tests.
"""
