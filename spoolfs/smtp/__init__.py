"""SMTP in: aiosmtpd owns the wire, our handler owns the policy."""
