"""copa as DSPy's fine-tuning provider: `AxolotlProvider` (copa.provider.lm) trains the chat rows
DSPy's weight optimizers hand over with copa's Axolotl backend (copa.provider.finetune), and
`copa.lm(...)` gives the dspy.LM that carries it. Nothing here loads on `import copa`."""
