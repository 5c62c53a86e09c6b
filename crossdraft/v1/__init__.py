"""Generated Python bindings of the wire contract `proto/crossdraft/v1/*.proto` (package crossdraft.v1).

Do not edit the `*_pb2*.py(i)` files: regenerate them with `bash scripts/gen_proto.sh`
(tests/test_proto.py checks that they match the .proto files). Only `crossdraft/wire.py` and the
services import them; the rest of the core library works on the dataclasses of `crossdraft.protocol`.
"""
