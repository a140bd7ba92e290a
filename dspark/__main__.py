"""`python -m dspark ...` is the `dspark` command."""

from dspark.server.cli import main

if __name__ == "__main__":
    main()
