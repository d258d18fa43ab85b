"""Files `stockpot init` copies into a new project (launch/scaffold.py)."""
