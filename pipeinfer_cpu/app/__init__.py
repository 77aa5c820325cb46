"""The user-facing process: the command line, the launcher, the chat front end, benchmarks."""
