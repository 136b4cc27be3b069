"""The home operator speaking for its vehicles at other operators: find, reserve, charge, pay."""
