"""Generates the gRPC stubs from the repository's .proto before building.

The stubs land in ``strata/v1/`` (git-ignored) so that regular and editable
installs both see them; the generated ``strata_pb2_grpc`` imports
``strata.v1.strata_pb2``, which is this package's own subpackage.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = PROTO_ROOT / "strata" / "v1" / "strata.proto"


def generate() -> None:
    if not PROTO.exists():
        raise SystemExit(
            f"{PROTO} not found: install strata-kv from a checkout of the Strata repository"
        )
    out = HERE / "strata" / "v1"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from proto/strata/v1/strata.proto; do not edit."""\n')
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


class GenerateStubs(Command):
    description = "generate strata/v1 gRPC stubs from proto/"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate()


class BuildPy(build_py):
    def run(self) -> None:
        generate()
        # The subpackage did not exist when packages were discovered.
        if "strata.v1" not in (self.packages or []):
            self.packages = list(self.packages or []) + ["strata.v1"]
        super().run()


class Develop(develop):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildPy, "develop": Develop, "generate_stubs": GenerateStubs})
