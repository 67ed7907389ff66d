"""`spool serve`: a small supervisor over worker processes (like Postfix's master)."""
