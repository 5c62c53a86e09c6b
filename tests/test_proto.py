"""The wire contract: the committed Python bindings match proto/crossdraft/v1/*.proto (regenerated
into a temp dir, byte for byte), and every generated module imports and its descriptors load."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "proto" / "crossdraft" / "v1").glob("*.proto"))
STEMS = [p.stem for p in PROTOS]
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_the_contract_has_its_four_files():
    assert STEMS == ["common", "drafter", "gateway", "verifier"]


def test_committed_stubs_match_the_proto_files(tmp_path):
    """The CI check: regenerate with the same command as scripts/gen_proto.sh and compare."""
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *[str(p.relative_to(ROOT)) for p in PROTOS]],
                   cwd=ROOT, check=True, capture_output=True)
    fresh = sorted(p.name for p in (tmp_path / "crossdraft" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "crossdraft" / "v1").iterdir() if p.name.endswith(SUFFIXES))
    assert fresh == committed == sorted(s + x for s in STEMS for x in SUFFIXES)
    stale = [n for n in fresh
             if (tmp_path / "crossdraft" / "v1" / n).read_bytes() != (ROOT / "crossdraft" / "v1" / n).read_bytes()]
    assert not stale, f"stubs out of date, run `bash scripts/gen_proto.sh`: {stale}"


@pytest.mark.parametrize("stem", STEMS)
def test_generated_modules_import_and_descriptors_load(stem):
    pb2 = importlib.import_module(f"crossdraft.v1.{stem}_pb2")
    importlib.import_module(f"crossdraft.v1.{stem}_pb2_grpc")
    fd = pb2.DESCRIPTOR
    assert fd.package == "crossdraft.v1" and fd.name == f"crossdraft/v1/{stem}.proto"
    assert fd.message_types_by_name or fd.enum_types_by_name


def test_services_and_their_rpcs():
    from crossdraft.v1 import drafter_pb2, gateway_pb2, verifier_pb2

    def rpcs(pb2, name):
        s = pb2.DESCRIPTOR.services_by_name[name]
        return {m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
                for m in s.methods}

    assert rpcs(gateway_pb2, "GatewayService") == {
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "GenerateUnary": ("GenerateUnaryRequest", "GenerateUnaryResponse", False, False),
        "AttachSession": ("AttachSessionRequest", "AttachSessionResponse", False, True),
        "GetSession": ("GetSessionRequest", "GetSessionResponse", False, False),
        "CancelSession": ("CancelSessionRequest", "CancelSessionResponse", False, False),
    }
    assert rpcs(drafter_pb2, "DrafterService") == {
        "GetInfo": ("DrafterServiceGetInfoRequest", "DrafterServiceGetInfoResponse", False, False),
        "RunSession": ("RunSessionRequest", "RunSessionResponse", False, True),
    }
    assert rpcs(verifier_pb2, "VerifierService") == {
        "GetInfo": ("VerifierServiceGetInfoRequest", "VerifierServiceGetInfoResponse", False, False),
        "GetTokenizer": ("GetTokenizerRequest", "GetTokenizerResponse", False, True),
        "Verify": ("VerifyRequest", "VerifyResponse", True, True),
    }


def test_style_rules():
    """buf-style rules a reviewer would check by eye: enum zero values are <ENUM>_UNSPECIFIED, every
    enum value carries its enum's prefix, every rpc has its own request and response, and every
    field, value, message and rpc has a comment in the .proto source."""
    from google.protobuf import descriptor_pb2

    from crossdraft.v1 import common_pb2, drafter_pb2, gateway_pb2, verifier_pb2

    used = []
    for pb2 in (common_pb2, drafter_pb2, gateway_pb2, verifier_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        pb2.DESCRIPTOR.CopyToProto(fdp)
        for enum in pb2.DESCRIPTOR.enum_types_by_name.values():
            prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
            assert enum.values[0].number == 0 and enum.values[0].name == prefix + "UNSPECIFIED"
            assert all(v.name.startswith(prefix) for v in enum.values)
        for s in pb2.DESCRIPTOR.services_by_name.values():
            for m in s.methods:
                used += [m.input_type.full_name, m.output_type.full_name]
    assert len(used) == len(set(used)), "a request or response message is shared by two rpcs"
    for path in PROTOS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_decl = (s.endswith(";") and "=" in s and not s.startswith(("option", "syntax"))) \
                or s.startswith(("rpc ", "service ", "enum ", "oneof "))
            if is_decl:
                assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1} has no comment: {s}"
