# The BERT 345M recipe of the 2019 README, shared by the pretrain_bert*.sh launchers (sourced, not run).
# --fp32-layernorm is not in the README's command line, but every 2019 BERT script carried it.
# The optimisation settings assume 64-way data parallelism.
BERT_345M_ARGS=(
       --num-layers 24
       --hidden-size 1024
       --num-attention-heads 16
       --batch-size 4
       --seq-length 512
       --max-preds-per-seq 80
       --max-position-embeddings 512
       --train-iters 1000000
       --resume-dataloader
       --cache-dir cache
       --lr 0.0001
       --lr-decay-style linear
       --lr-decay-iters 990000
       --weight-decay 1e-2
       --clip-grad 1.0
       --warmup .01
       --fp16
       --fp32-layernorm
       --fp32-embedding
)
# Loose-json data (set the corpus with TRAIN_DATA: an alias configured through MEGATRON_CORPORA /
# MEGATRON_CORPUS_<ALIAS>, or a path), one sentence per line (scripts/presplit_sentences_json.py).
BERT_JSON_DATA_ARGS=(
       --train-data "${TRAIN_DATA:-wikipedia}"
       --lazy-loader
       --presplit-sentences
       --split 949,50,1
)
BERT_WORDPIECE_ARGS=(
       --tokenizer-type BertWordPieceTokenizer
       --tokenizer-model-type bert-large-uncased
)
