"""Training and evaluation of block drafters (``specserve train-drafter`` / ``eval-drafter``)."""
