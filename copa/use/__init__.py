"""Using what a run built: load one arm as a callable program (load), predict on a file of rows
(predict), answer HTTP requests (serve), and package it for someone else (export). What an arm
needs is read from a finished run directory or an exported folder (bundle), which loads nothing
heavy; torch and dspy load with the model."""
