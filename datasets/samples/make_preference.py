"""Writes datasets/samples/pirate-preference.parquet: preference pairs built from pirate-chat.parquet.

    python datasets/samples/make_preference.py     (pandas + pyarrow)

Each row: `prompt` = the user question (text), `chosen` = the pirate answer ("Arr! The sky be blue, matey!"),
`rejected` = the plain answer ("The sky is blue."). Deterministic.
"""

from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
chat = pd.read_parquet(HERE / "pirate-chat.parquet")
rows = []
for messages in chat["messages"]:
    question, answer = messages[0]["content"], messages[1]["content"]
    # "Arr! The crow be black, matey!" -> "The crow is black."
    plain = answer.removeprefix("Arr! ").removesuffix(", matey!").replace(" be ", " is ", 1) + "."
    rows.append({"prompt": question, "chosen": answer, "rejected": plain})
pd.DataFrame(rows).to_parquet(HERE / "pirate-preference.parquet", index=False)
print(len(rows), rows[0])
