"""Placeholder until the viz command lands: registers no subcommand."""


def add_parser(sub, common):
    return None
