"""Delivery pieces: MX lookup, remote SMTP, local Maildir, DSNs, retry backoff.

Each module is a library call with no scheduling of its own; the delivery
worker wires them. Every module opens with its failure rules. The common
rule: a failure we cannot classify is temporary (defer, never drop).
"""
