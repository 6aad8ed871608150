"""The paper AGR comes from, in one place: its title and its BibTeX.

The docs take both from here (``docs/conf.py``); ``tests/test_citation.py`` checks that the
README's BibTeX is this one and that no page names the paper otherwise.
"""

__all__ = ["CITATION", "TITLE", "VENUE"]

#: The paper's title, as published (ACM Multimedia 2024) and as the authors' repository gives it.
TITLE = (
    "Balancing Generalization and Robustness in Adversarial Training via Steering through Clean and "
    "Adversarial Gradient Directions"
)
VENUE = "ACM Multimedia 2024"

#: BibTeX of the paper, the authors' entry (https://github.com/RUIYUN-ML/AGR).
CITATION = """\
@inproceedings{tong2024balancing,
  title     = {Balancing Generalization and Robustness in Adversarial Training via Steering
               through Clean and Adversarial Gradient Directions},
  author    = {Tong, Haoyu and Zhang, Xiaoyu and Yulin, Jin and Lou, Jian and Wu, Kai and Chen, Xiaofeng},
  booktitle = {ACM Multimedia 2024},
  year      = {2024}
}"""
