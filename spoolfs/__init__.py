"""spoolfs: the files on disk and the mail server that moves them."""
