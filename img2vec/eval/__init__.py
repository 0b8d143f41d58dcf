"""Downstream evaluations of a pretrained encoder, each a module with a command line:

    python -m img2vec.eval.knn           weighted kNN (DINO); KnnMonitor is the in-training metric
    python -m img2vec.eval.linear_probe  BatchNorm(affine=False) + Linear on frozen features (MAE)

Fine-tuning is img2vec/finetune.py, a DeepSpeed entry point like pretraining; the shared
loading helpers live in img2vec.eval.common.
"""
