"""Run OmniCRM from a checkout: `python cli.py …` is `omnicrm …`."""
from omnicrm.cli import main

if __name__ == "__main__":
    main()
