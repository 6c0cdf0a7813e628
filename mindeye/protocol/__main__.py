"""`python -m mindeye.protocol keygen DIR NAME`: write a CURVE key pair for one host (docs/protocol.md)."""
from __future__ import annotations

import argparse

from mindeye.protocol.transport import create_keypair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mindeye.protocol", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (private)")
    keygen.add_argument("directory")
    keygen.add_argument("name", help="the host's role, e.g. scanner, gpu, viewer1")
    args = parser.parse_args(argv)
    public_file, secret_file = create_keypair(args.directory, args.name)
    print(f"public key (copy to the other side): {public_file}\nsecret key (stays on this host):     {secret_file}")


if __name__ == "__main__":
    main()
