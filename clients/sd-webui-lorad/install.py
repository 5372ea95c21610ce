"""A1111 runs this before loading the extension: install what the tab needs, and nothing else.

grpcio only (it does not depend on protobuf); protobuf only if absent, because A1111 pins 3.20.x
and other extensions break when it changes. The tab's stubs import under protobuf >= 3.20.
"""

import launch

if not launch.is_installed("grpcio"):
    launch.run_pip("install grpcio", "grpcio for the lorad LoRA Training tab")
if not launch.is_installed("protobuf"):
    launch.run_pip("install protobuf", "protobuf for the lorad LoRA Training tab")
