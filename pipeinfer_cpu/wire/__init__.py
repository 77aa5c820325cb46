"""The wire between ranks: every message's format, and the transport that carries them."""
