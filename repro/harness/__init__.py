"""spec -> plan -> execute -> store -> compare -> render: everything that knows about specs and runs."""
