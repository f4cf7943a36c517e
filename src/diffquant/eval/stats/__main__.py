"""`python -m diffquant.eval.stats`: regenerate the shipped reference statistics."""

from diffquant.eval.stats import main

raise SystemExit(main())
