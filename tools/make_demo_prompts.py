#!/usr/bin/env python3
"""Write the demo RL prompt files: ``prompts_train.jsonl`` and ``prompts_eval.jsonl``.

Provenance: every prompt added here was written by hand for this project, either
as a whole line (``HANDWRITTEN``: one list per topic) or as a request form with its
own hand-written fills (``TEMPLATES``: e.g. a haiku form with its own subjects, a
rewrite form with its own sentences). Nothing is downloaded.

The first ``BASE_TRAIN`` / ``BASE_EVAL`` lines of the two files (the prompts that
shipped before this script) are kept as they are, at the top. The additions are
split topic by topic at random with a fixed seed, about ``EVAL_FRACTION`` of each
topic going to the eval file, so the held-out prompts come from the same spread of
topics and forms but are never trained on. Each file's additions are then shuffled
(so any prefix, as taken by ``max_prompts`` or iterated DPO's chunks, mixes topics).

Running it again rewrites the same two files byte for byte. It checks, and exits
non-zero when one fails:

* no duplicate prompt within or across the two files, none equal to a prompt of
  ``sft.jsonl``, and no added prompt with the same content words as another one
  (texts compared lowercased with whitespace collapsed);
* every prompt 3-40 words of plain text (no control characters, no U+2028,
  U+2029, U+0085), each line a JSON object ``{"prompt": ...}`` written with
  ``ensure_ascii=False``;
* at least ``MIN_TRAIN`` / ``MIN_EVAL`` prompts; every topic of the additions in
  both files in proportion; no template more than ``MAX_TEMPLATE_SHARE`` of all.

    python3 tools/make_demo_prompts.py            # write both files and check them
    python3 tools/make_demo_prompts.py --check    # check the files as they are
"""

from __future__ import annotations

import json
import random
import re
import string
import sys
import unicodedata
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "rlhfkit" / "assets" / "demo"
TRAIN_FILE = DEMO / "prompts_train.jsonl"
EVAL_FILE = DEMO / "prompts_eval.jsonl"
SFT_FILE = DEMO / "sft.jsonl"

SEED = 1729
EVAL_FRACTION = 0.18
BASE_TRAIN = 160  # lines of prompts_train.jsonl that predate this script, kept at the top
BASE_EVAL = 64  # the same for prompts_eval.jsonl
MIN_TRAIN = 1100
MIN_EVAL = 240
MIN_WORDS, MAX_WORDS = 3, 40
MAX_TEMPLATE_SHARE = 0.03  # of all prompts in both files
BAD_CHARS = {"\u2028", "\u2029", "\u0085"}

# ---------------------------------------------------------------------------------
# Hand-written prompts, one per line, by topic.
# ---------------------------------------------------------------------------------

HANDWRITTEN = {
    "cooking": """
How do I keep pasta from sticking together?
what can i make with leftover rice
Is it safe to refreeze meat that thawed in the fridge?
How can I tell if an egg is still fresh?
What's a good substitute for buttermilk?
My caramel keeps turning grainy. What am I doing wrong?
Give me three quick toppings for plain yogurt.
What's the trick to a lump-free roux?
Why do recipes say to use room-temperature butter?
How long does it take to caramelize onions properly?
Can I use olive oil instead of vegetable oil in brownies?
What's the easiest way to cut a mango?
how long do i bake chicken thighs at 200C
Is brown sugar just white sugar with molasses?
Which herbs go well with lamb?
How can I make a weeknight stir-fry taste like takeout?
Suggest a simple side dish for grilled fish.
My hollandaise split. Can I save it?
Is there a way to cook dried beans without soaking them overnight?
Suggest a no-cook dinner for a really hot day.
How much dry pasta should I cook per person?
What's the trick to peeling hard-boiled eggs easily?
Can I freeze a fresh loaf of bread?
My chili is too watery. How do I thicken it?
What's a good breakfast I can prep the night before?
Is a rice cooker worth buying if I only cook for one?
how to make popcorn on the stove without burning it
What can I do with stale tortillas?
Why do my muffins come out with big holes inside?
Any tips for toasting nuts without burning them?
What's a quick sauce for plain chicken breast?
My cutting board slides around on the counter. Any fix?
Can frozen vegetables be roasted without going soggy?
Give me an easy dinner idea using canned tuna.
How do I make cold brew coffee?
Why does rice stick to the bottom of my pot?
What's a cheap dinner that feeds four?
What keeps lettuce crisp for longer in the fridge?
Is it okay to eat a potato that has turned a bit green?
How do I stop the bottom of my pie crust from getting soggy?
What goes well with roasted butternut squash?
I have one onion, two eggs and a block of cheese. Dinner ideas?
Should I salt pasta water, and how much?
What's the best oil for frying at high heat?
Can I make pizza without yeast?
My pancakes are burnt outside and raw inside. Help?
Is it fine to put hot food straight into the fridge?
How do you know when a cake is done baking?
i only have a microwave. what can i cook that's actually good
What's a good way to use up a bag of spinach before it goes bad?
Why do my fries never come out crispy at home?
""",
    "home": """
My bathroom sink drains really slowly. How can I fix it without harsh chemicals?
What's the best way to remove limescale from a kettle?
How often should bed sheets be washed?
how do i get rid of the smell in my fridge
The grout in my shower has gone dark. How do I clean it?
What's a quick 15-minute tidy-up before guests arrive?
How do I hang a heavy mirror on drywall?
Why does my toilet keep running?
How can I keep my home cool in summer without AC?
Is there an easy way to descale a shower head?
What gets dog hair off a fabric sofa?
Is it safe to mix bleach and vinegar for cleaning?
My windows get covered in condensation every winter morning. What can I do?
Can you explain how to fold a fitted sheet?
How do I clean a stainless steel fridge without leaving streaks?
What removes sticker residue from glass?
My radiator is cold at the top and warm at the bottom. What's going on?
What's the easiest way to patch a small nail hole in the wall?
What's a fair way to split chores with a partner?
how often should i change my vacuum filter
How do I keep my bathroom from getting moldy?
I burned rice onto the bottom of a pan. How do I clean it?
What should I keep in a basic home toolkit?
Ants keep showing up in my kitchen. What's a pet-safe way to get rid of them?
How can I make my bedroom darker for sleeping?
Is a robot vacuum worth it for a small apartment?
Can I put a down pillow in the washing machine?
I get too attached to things to declutter. Any tips?
I spilled red wine on the carpet. What do I do right now?
Our smoke alarm keeps chirping. How do I make it stop?
How can I make a rented apartment feel like home without painting?
What are some simple ways to lower my electricity bill?
Is there a right way to load a dishwasher?
How do I freshen up an old mattress?
What's the best way to clean window blinds?
How can I stop my front door from slamming shut?
My kitchen drawers are a total mess. How should I organize them?
Should I turn off the water before going on a long vacation?
What's the easiest way to clean the inside of an oven?
How do I get rid of a squeaky floorboard?
What's a good weekly cleaning schedule for a busy person?
How do I wash a wool sweater without shrinking it?
Is it bad to leave the heating on low all day?
""",
    "travel": """
How can I get through airport security faster?
Is it better to exchange money before I travel or when I arrive?
How do I find a good local restaurant when I'm traveling?
what do i need to bring for a weekend at the beach
Any tips for avoiding tourist traps in a big city?
Is tap water safe to drink in most of Europe?
I'm going on my first cruise. What should I know?
How do I keep my phone charged while sightseeing all day?
Should I book hostels in advance or as I go when backpacking?
Any tips for surviving an overnight bus ride?
What's a good way to keep a travel journal?
How can I meet people while traveling alone?
What should I pack for a ski trip?
I missed my connecting flight. What are my options?
Hostel or hotel for a first solo trip?
Where's the best seat on a plane for a nervous flyer?
How do I plan a route for a two-week road trip?
The hotel room isn't what I booked. What should I say at the front desk?
How do I visit a big museum without getting exhausted?
How can I find out whether I need a visa for a trip?
Is it rude not to speak the local language when I travel?
What's a good gift to bring a host family abroad?
How do I avoid huge roaming charges on my phone?
What's the best way to see a city on foot?
How do I deal with altitude sickness on a mountain trip?
how do i not get lost in a city where i can't read the signs
What should I check before booking a vacation rental?
Can I bring snacks through customs?
How do I fly with a guitar?
Any tips for a family day at a theme park?
Is airport lounge access worth paying for?
How do I pack toiletries so they don't leak in my bag?
What's a fun way to explore a new city on a budget?
We're flying long-haul with a baby. How do we prepare?
What's the best way to get over a jet-lagged first day?
Should I get a local SIM card or an eSIM when traveling?
What should I do on my first evening in a new city?
How early should I book train tickets for the best price?
What's a polite way to decline a street vendor?
What's one thing people always forget to pack?
Is it safe to use public Wi-Fi at the airport?
What should I do if I get sick while traveling abroad?
""",
    "study": """
How can I remember formulas for a physics test?
What's spaced repetition and how do I use it?
I keep re-reading my notes but nothing sticks. What should I do instead?
What's a good way to summarize a long chapter?
What sections go in a lab report?
how do i ask a question in class without feeling dumb
How should I choose a topic for my dissertation?
Any tricks for learning the periodic table?
How can I study while working full time?
I froze during my last exam. How do I stop that happening again?
How do I read an academic paper quickly?
What should go into a study plan for a language exam?
Any tips for staying focused in online classes?
Is it better to handwrite notes or type them?
How should I email a teacher about a grade I think is wrong?
What's the best way to study for a multiple-choice exam?
What's a good way to learn a poem by heart?
What is a mind map, and how do I make one?
I always run out of time on essay exams. Tips?
My roommate is loud when I'm trying to study. What can I do?
I like too many subjects to pick a major. How do I decide?
What are some good habits for the first week of college?
How do I prepare for an open-book exam?
how many breaks should i take when studying
What is the Feynman technique?
How do I get more out of office hours?
I can't stop comparing my grades to my friends'. Any advice?
What's a good way to practice for a spelling bee?
I only have two hours tonight to study for a test. How should I use them?
What makes a good abstract for a paper?
How do I catch up after missing a week of classes?
Should I take a gap year before university?
What's the best way to learn from my mistakes on a graded test?
How do I stay awake while studying late without more coffee?
What's a good study playlist: music with lyrics or without?
My study group keeps chatting instead of studying. What do I do?
""",
    "coding": """
How do I get the length of a list in Python?
What's the difference between a class and an object?
How do I write a one-line if statement in Python?
What does 'localhost' mean?
How can I see what I've changed since my last git commit?
What's a JSON file?
What does 'async' mean in JavaScript?
Why does 0.1 + 0.2 not equal 0.3 in most languages?
How do I install a Python package for just one project?
How do I get today's date in Python?
What is a pull request?
what does 'segmentation fault' mean
How do I read command-line arguments in Python?
What is a race condition, in simple terms?
What makes a good commit message?
What does 'deprecated' mean in software?
How do I round a number to two decimal places in Python?
What's an environment variable?
How would I find the biggest number in a list without using max()?
Library vs framework: what's the difference?
I committed a file by accident. How do I stop git tracking it?
What is a hash function used for?
Is it bad to copy code from Stack Overflow?
How do I split a string by commas in JavaScript?
What's a good way to ask for help when I'm stuck on a bug?
What's the difference between a process and a thread?
how do i exit vim
What does the HTTP status code 404 mean?
How can I make a Python script run every day automatically?
What's the difference between 'let' and 'const' in JavaScript?
What does 'self' mean in a Python class?
Why is my Python variable 'None' when I expected a value?
What's a stack trace and how do I read one?
How do I check which version of Python I have?
What's the difference between a list comprehension and a for loop?
What is a pure function?
What's the point of code reviews?
How do I write a docstring in Python?
What does 'import' actually do in Python?
How do I make a simple countdown timer in JavaScript?
""",
    "tech_help": """
My phone storage is always full. How do I free some up?
Why does my phone get hot while charging?
How do I take a screenshot on a Windows laptop?
What's two-factor authentication, and should I turn it on?
How can I tell if an email is a phishing scam?
my bluetooth headphones won't connect to my laptop
How can I make the text bigger on my mom's phone?
Should I shut my computer down at night or just let it sleep?
How do I share my screen on a video call?
What's the difference between RAM and storage?
How do I stop apps from tracking my location?
Is a password manager safe to use?
What's the simplest way to connect my laptop to a TV?
Why does my printer say it's offline when it's clearly on?
How can I find the Wi-Fi password saved on my computer?
What's the easiest way to move everything to a new phone?
What does clearing the cache actually do?
How do I set up parental controls on a tablet?
My laptop won't turn on at all. What should I check first?
How do I know if my computer has a virus?
What's a VPN, and do I need one at home?
How do I stop getting so many marketing emails?
Is it okay to leave my phone charging overnight?
How can I turn a photo of a document into a PDF on my phone?
How do I mute a group chat without leaving it?
What should I do before selling my old phone?
how do i turn off autocorrect
Any tips to make my laptop battery last longer?
Why do my emails keep landing in people's spam folders?
What's cloud storage, and how is it different from a hard drive?
Is my smart speaker listening to everything I say?
The sound on my TV is out of sync with the picture. How do I fix it?
How do I type an accented letter like é on a keyboard?
What's the difference between a browser and a search engine?
Should I install updates right away or wait a few days?
How do I see which apps drain my phone battery?
What's a good way to organize files on my computer?
My keyboard types the wrong symbols all of a sudden. What happened?
How do I block a number that keeps texting me?
What's an easy way to back up my laptop?
""",
    "writing": """
What should a thank-you email after an interview say?
When do I use 'who' and when 'whom'?
How do I make a boring topic interesting to read?
Is it 'I could care less' or 'I couldn't care less'?
How long should a paragraph be?
What's passive voice, and when is it okay to use it?
What's a good hook for the start of a blog post?
Help me write a short out-of-office reply.
How do I give feedback on a friend's writing without hurting them?
When should I use a colon?
Is 'alot' a word?
What should a cover letter for a career change focus on?
What's the difference between 'i.e.' and 'e.g.'?
What is a run-on sentence?
My emails sound harsh even when I don't mean them to. How do I soften them?
should i use oxford commas
How do I write about my achievements without sounding arrogant?
What should I say in a condolence card for a coworker?
What makes a headline worth clicking?
What's a good way to sign off an email to someone I don't know?
What should I include in a reference for a former employee?
How do I describe a setting without long boring paragraphs?
What's the difference between a memoir and an autobiography?
Can you explain what 'show, don't tell' means?
Should I write my novel in past or present tense?
How can I make my résumé bullet points stronger?
How do I write a good first line for a short story?
What is a topic sentence?
Can I use contractions in a formal essay?
How do I cut a 300-word bio down to 100 words?
What's the best way to structure a short persuasive speech?
How do I write a LinkedIn post that doesn't sound cringey?
When should I spell out numbers instead of using digits?
What's an easy way to avoid repeating the same word?
How do I write a wedding card message for a couple I barely know?
""",
    "work": """
When is the best time to ask for a raise?
How do I tell my boss I'm overwhelmed?
What should I focus on in my first week at a new job?
What goes in a short resignation letter?
Our meetings keep going off-topic. How can I keep them on track?
Is it okay to take a lunch break when I'm really busy?
How should I prepare for a performance review?
How do I answer 'what's your biggest weakness' in an interview?
What's a good way to network if I'm an introvert?
what should i wear to a job interview at a startup
How do I explain a gap in my resume?
A coworker keeps taking credit for my work. What should I do?
I'm running my first team meeting as a new manager. Any tips?
What's the best way to admit a mistake at work?
Should I accept a counteroffer from my current employer?
How do I stay focused in an open-plan office?
How can I set boundaries when working from home?
What makes a good LinkedIn headline?
How long should I wait before following up after a job interview?
Is it realistic to switch careers in my thirties?
What questions should I ask at the end of an interview?
I find it hard to delegate. How do I get better at it?
My boss sends messages late at night. Do I have to reply?
How do I give a coworker constructive criticism?
What helps make a good impression in a video interview?
What's a good way to keep track of my wins at work?
How can I politely decline a meeting invite?
How do I ask for a day off on short notice?
Is it okay to job hunt while I'm still employed?
How do I stay calm with a difficult customer?
What's the best way to welcome a new team member?
I keep working late every night. How do I stop?
How do I ask a coworker to stop eating at my desk?
How do I open a work presentation without being boring?
Should I tell my manager I'm looking for another job?
How can I make a one-on-one with my manager more useful?
What's the best way to prepare for a phone screen?
How do I handle being the youngest person on my team?
""",
    "health_habits": """
How can I remember to take my vitamins every day?
What's a good bedtime routine for adults?
How many steps a day is actually enough?
Is it bad to drink coffee on an empty stomach?
How do I stop snacking late at night?
How can I protect my eyes when working on a computer all day?
what's a healthy amount of sugar per day
How can I fit exercise into a busy schedule?
Is it okay to skip breakfast?
How can I get more daylight in winter?
Any tips for staying healthy on night shifts?
I hit an energy slump every afternoon around 3. What helps?
How long should a power nap be?
What are easy ways to eat more fiber?
What's a simple way to keep track of what I eat?
How often should I replace my toothbrush?
Is it better to shower in the morning or at night?
I want to read before bed instead of scrolling. How do I make that stick?
What's the right way to wash my hands?
I want to cut back on alcohol. Where do I start?
How do I get back on track after a week of eating junk food?
Why do I wake up tired even after eight hours of sleep?
How can I stop biting my nails?
What helps with seasonal allergies besides medicine?
How can I make my lunch break actually restful?
Do I need sunscreen on cloudy days?
Is it bad to eat right before going to bed?
How can I drink fewer sugary drinks?
What's a healthy snack for the afternoon that keeps me full?
How do I know if I'm getting enough protein?
Is it fine to use my phone in bed if the screen is dimmed?
How do I stop clenching my jaw when I'm stressed?
""",
    "wellbeing": """
How do I stop overthinking everything?
What's a quick way to calm down when I'm angry?
My to-do list makes me feel overwhelmed. What do I do?
I feel like I'm not good enough at anything.
How do I deal with Sunday night dread about work?
Can you give me a breathing exercise I can do in one minute?
How do I stop comparing myself to people on social media?
How can I be kinder to myself after a mistake?
how do i cope with homesickness
What are some small things that can lift my mood?
How do I stop worrying about things I can't control?
How do I know if I need a break from work?
How can I feel less lonely when living alone?
What's a gratitude journal, and does it actually help?
I feel stuck in a rut. How do I get out of it?
I get nervous calling people on the phone. Any tips?
Why is it worth celebrating small wins?
How do I keep my New Year's resolutions past February?
What are the first steps to recovering from burnout?
Is it normal to feel sad after a vacation ends?
I keep replaying awkward conversations in my head at night.
How can I become a more patient person?
How do I say no without feeling guilty?
What's a healthy way to deal with criticism?
How can I enjoy my own company more?
""",
    "fitness": """
What's a good beginner workout I can do at home without equipment?
What does a proper push-up look like?
How long should I rest between sets?
Should I do cardio before or after weights?
What should I eat before a morning run?
How do I avoid shin splints?
how do i get better at pull ups when i can't do even one
How often should I stretch?
How long should a beginner hold a plank?
How do I stay motivated to go to the gym in winter?
Is it okay to work out with sore muscles?
What's a good running pace for a beginner?
How should I warm up before lifting?
What exercises help with a stronger lower back?
I want to start cycling to work. What do I need?
What are some easy exercises to improve my balance?
What should I look for in running shoes?
What's a good workout for a 20-minute lunch break?
How should I breathe while running?
Is a rowing machine worth using at the gym?
What's a rest day, and do I really need one?
My knees hurt when I squat. Am I doing it wrong?
I signed up for my first 5K. How do I train?
What should I bring to my first yoga class?
I get bored of my workout routine fast. How can I mix it up?
Is swimming a good full-body workout?
how many days a week should a beginner lift weights
Is it better to exercise in the morning or evening?
How do I start jogging if I can't run for more than a minute?
What's a good stretch for tight hamstrings?
How much should I walk a day to stay healthy?
Are stairs a good workout?
""",
    "money": """
How do I read my payslip?
I'm in credit card debt. What's a good first step?
How can I track my spending without a fancy app?
Is it worth paying off my car loan early?
What is a credit limit?
How can I save money on my phone bill?
What's the difference between gross and net income?
How do I find and cancel subscriptions I forgot about?
How much should I keep in my checking account?
What's a good way to save for a holiday?
what happens if i miss a credit card payment
How do I avoid spending more every time I get a raise?
What is diversification in investing?
Should I buy or lease a car?
How do I budget when my income changes every month?
What are some fun things to do for free on a weekend?
I spend money when I'm bored. How do I stop?
What's a no-spend challenge?
How much should I spend on a wedding gift?
How do we split a restaurant bill fairly when some people ordered more?
What is a high-yield savings account?
Is it smart to use buy now, pay later services?
How do I start saving when I live paycheck to paycheck?
What are the pros and cons of a joint bank account?
How often should I check my credit report?
What is a dividend?
Should I tip on takeout orders?
What are some realistic ways to make a little extra money on the side?
How can a teenager learn to budget their allowance?
What's a reasonable grocery budget for one person?
Is it better to pay rent with a credit card for the points?
How do I say no to friends' expensive plans without feeling cheap?
What's the difference between saving and investing?
Should I keep my old credit card open after I stop using it?
How do I make a simple monthly budget on paper?
""",
    "shopping": """
How can I tell if an online store is legit?
What should I look for when buying a mattress?
Is it worth buying refurbished electronics?
How do I pick a ripe pineapple?
What should I check before buying a used car?
how do i return something without a receipt
I keep buying clothes I never wear. How do I stop?
What's the smartest way to compare prices at the grocery store?
Should I buy a laptop or a tablet for school?
What should I look for in a good winter coat?
How can I tell if a sale is actually a good deal?
What matters most when buying a vacuum cleaner?
How do I get the right shoe size when ordering online?
Is store-brand medicine as good as the brand name?
Nonstick, stainless or cast iron: which frying pan should I buy?
What's worth buying secondhand?
What should I look for in a good backpack?
What's a thoughtful gift under $20?
How do I pick a bottle of wine for a dinner party?
Is an expensive chef's knife worth it?
How do I figure out which phone plan is right for me?
What should I buy first for my first apartment kitchen?
how to choose a good pair of sunglasses
Is it better to buy in bulk if I live alone?
What should I know before buying a kayak?
What should I know before buying a gaming chair?
How can I tell if a product review is fake?
What's a good gift for a new dad?
Should I buy an extended return window when shopping online?
""",
    "relationships": """
How do I apologize when I really messed up?
How do I tell my partner I need more alone time?
How can I be a better listener?
My best friend is moving away. How do we stay close?
How do I set boundaries with my parents as an adult?
What's a good way to reconnect with an old friend?
A friend always cancels plans at the last minute. How do I handle it?
how do i tell someone i like them
What should we do for our first anniversary?
How do I deal with jealousy in a relationship?
I don't know anyone at this wedding. How do I make small talk?
A friend wants to borrow money again. How do I say no?
My partner and I keep arguing about chores. How do we fix it?
What do I say to someone whose pet just died?
How can I meet new people when I work from home?
I'm always the one who plans everything. How do I change that?
What's a kind way to tell my roommate they're too loud?
How should I respond when someone gives me a compliment?
My friend keeps interrupting me. How do I bring it up?
How can I get along better with my in-laws?
How do I end a friendship that's become toxic?
What keeps a long-distance relationship working?
What's a thoughtful way to show appreciation to my partner?
Someone in my group chat started an argument. Should I step in?
What's a good way to introduce my partner to my family?
How do I comfort someone who is crying?
Is it weird to text a friend I haven't talked to in years?
What's a polite way to leave a party early?
What are good questions to ask on a second date?
My sister and I haven't spoken in months. How do I break the ice?
How do I tell a friend their joke offended me?
How often should I call my parents?
How do I support a friend who just lost their job?
How do I stop being a people pleaser?
""",
    "parenting": """
My toddler only eats pasta. Should I worry?
What's a good bedtime routine for a five-year-old?
How do I handle a tantrum in the middle of a store?
How much screen time is okay for a seven-year-old?
How do I explain death to a young child?
What chores can a six-year-old do?
My kids fight constantly in the car. Any tips?
how do i talk to my kid about a bad grade
What are some fun indoor activities for kids on a rainy day?
How do I prepare my child for their first day of school?
How can I get my kid to read more?
What's an easy way to teach a child to tie their shoes?
What's a good age to give a child a phone?
How can I help my teen with exam stress?
How can I spend quality time with my kids when I'm busy?
How do I stop yelling at my kids?
How can I reward good behavior without bribing?
What are the first things to childproof in a kitchen?
My child is shy. How do I help them make friends?
What should be in a diaper bag?
How can I get my baby to nap longer?
How do I explain to my kid why we can't buy every toy?
What's a fun way to teach kids to count?
My teenager sleeps until noon every weekend. Is that normal?
How do I help siblings learn to share?
What's a good first pet for a child?
How do I keep kids busy on a long flight?
What's a healthy lunchbox idea for a picky eater?
How do I talk to my kids about online safety?
What's a good way to handle a child who lies?
Is it okay to let my kid quit piano after a month?
How do I get my kids to help clean up after dinner?
""",
    "pets": """
How often should my dog see the vet?
Why does my cat knock things off the table?
How do I trim my dog's nails without stressing him out?
Which human foods are toxic to dogs?
My puppy bites everything. How do I stop it?
How much should I feed my cat?
Is it okay to leave my dog home alone all day?
What do I need to set up a tank for a betta fish?
how do i know if my hamster is happy
Why does my dog eat grass?
We're having a baby. How do I prepare our dog?
What's the best way to house-train a puppy?
How do I keep an indoor cat from getting bored?
Is it normal for my rabbit to thump its feet?
How do I get my cat used to its carrier?
What should I ask before adopting a rescue dog?
My dog barks every time someone knocks. How do I stop it?
How often should I clean the litter box?
Can dogs eat peanut butter?
How do I help my dog cope with fireworks?
What does it mean when a cat slow-blinks at you?
Is brushing a dog's teeth really necessary?
How do I keep my guinea pigs cool in summer?
How do I teach my dog to come when called?
What are signs that my cat might be sick?
Should I get one kitten or two?
My dog is terrified of the vacuum. What can I do?
How long can a goldfish live?
Why does my cat bring me dead mice?
How can I tell if my dog is overweight?
How do I introduce my dog to a new puppy?
What should I pack for my dog on a camping trip?
""",
    "gardening": """
When should I plant tomatoes?
Why are the leaves on my tomato plant turning yellow?
How do I start composting in a small backyard?
What herbs are easy to grow on a windowsill?
How often should I water a cactus?
Is there a natural way to get rid of aphids?
What vegetables grow well in containers?
how do i repot a plant without killing it
Why is my basil wilting?
What's the difference between annuals and perennials?
Squirrels keep digging up my garden. What can I do?
When is the best time to prune roses?
Can I grow new plants from cuttings?
What's a good plant for a shady balcony?
How do I know if I'm overwatering my plants?
How can I attract bees and butterflies to my garden?
What should I do in the garden in autumn?
Are coffee grounds good for plants?
Can I grow strawberries in pots?
Why is my lawn turning brown in patches?
What's the easiest way to start seeds indoors?
What does 'full sun' mean on a plant label?
Slugs are eating my lettuce. What can I do?
Is it too late to plant garlic in November?
My peace lily is drooping. Can I revive it?
What's the easiest fruit tree for a beginner?
How deep should I plant tulip bulbs?
I only have a sunny doorstep. What can I grow?
what's eating holes in my kale
How do I save seeds from my tomatoes?
Should I water my garden in the morning or evening?
What's mulch, and do I need it?
""",
    "hobbies": """
Can I learn guitar on my own?
What's an easy knitting project for a beginner?
How can I get better at chess?
What should I know before buying my first camera?
How do I start a book club?
What's a relaxing hobby I can do in the evening?
How do you learn to juggle?
how do i get into birdwatching
What supplies do I need to start watercolor painting?
Is it possible to learn piano without a teacher?
What size jigsaw puzzle is good for a first try?
I want to run a tabletop role-playing game for friends. Where do I start?
How do I take better photos with my phone?
What's a fun hobby for someone who likes puzzles?
How do I sew a button back on?
How can I get started with pottery?
Is it too late to learn to dance as an adult?
How do I find time for hobbies when I work full time?
Is there a simple method for solving a Rubik's cube?
I'd like to start writing poetry. Where do I begin?
What should I look for in a beginner telescope?
How can I improve my handwriting?
I want to start a podcast with no budget. Is that possible?
What's the easiest card trick to learn?
How do I tune a ukulele?
How do I get into rock climbing safely?
What's a good hobby to do with my hands while watching TV?
How do I learn calligraphy?
I feel guilty about hobbies that aren't productive. Is that silly?
What's a good first model kit to build?
How do I start a small herb-drying or flower-pressing hobby?
What's a good hobby to share with my teenager?
What's the best way to practice drawing faces?
How do I start learning to crochet?
""",
    "science": """
Why is the sky red at sunset?
How do fish breathe underwater?
Why does bread rise?
What is static electricity?
Why do we yawn?
How do clouds stay up in the sky?
Why does salt melt ice on the road?
What is a comet made of?
How do chameleons change color?
Why do our fingers wrinkle in water?
Why do we have different blood types?
How does a microwave oven heat food?
Why do cats usually land on their feet?
How do bats find their way in the dark?
What causes hiccups?
How long does sunlight take to reach Earth?
How do trees get water all the way to the top?
Why do we get brain freeze?
what are sound waves
How do glow sticks glow?
Why do some people need glasses?
How does soap get rid of germs?
What is a solar eclipse?
Why do planets orbit the sun?
How do penguins stay warm?
Why do apples turn brown after cutting?
What is a tsunami?
How do fireflies light up?
What's inside the Earth?
Why does metal feel colder than wood at the same temperature?
How does a compass work?
What is the water cycle?
Why do we have fingerprints?
How does GPS know where I am?
How many bones are in the adult human body?
Why do mosquitoes bite some people more than others?
How do whales sleep without drowning?
Why does a spoon look bent in a glass of water?
What is an element, in chemistry?
Why does hot air rise?
How do seeds know when to sprout?
Why do our ears pop on a plane?
""",
    "history": """
Why was the Great Wall of China built?
Who was Cleopatra?
What was the Renaissance?
How were the pyramids of Giza built, as far as we know?
Why did the Titanic sink?
What was the Silk Road?
Who invented the printing press?
Why did the Western Roman Empire fall, in short?
What was the Industrial Revolution?
When did people first land on the moon?
Who was Marie Curie?
What was the Cold War, in simple terms?
Why is the Magna Carta important?
what were the olympics like in ancient greece
How did people tell time before clocks?
Who were the Vikings?
Why did the Berlin Wall come down?
When was the first photograph taken?
How did ancient sailors navigate without GPS?
Who was Ada Lovelace?
What was the Black Death?
Why do we call them Arabic numerals?
What was daily life like in a medieval castle?
Who built Machu Picchu?
How old are the oldest known cave paintings?
What started World War I, briefly?
Who was Nelson Mandela?
Why did countries switch from the Julian to the Gregorian calendar?
What was the California Gold Rush?
What happened on the Wright brothers' first flight?
When was paper money first used?
What was the Ottoman Empire?
How did the ancient Egyptians make mummies?
What was Stonehenge used for?
What did ordinary people eat in ancient Rome?
Who was the first woman to fly solo across the Atlantic?
What was the Apollo 13 mission?
Why is 1066 a famous year in English history?
""",
    "language": """
How do you pronounce 'quinoa'?
Where does the word 'salary' come from?
What's the plural of 'octopus'?
Why is English spelling so weird?
What's the difference between a dialect and a language?
What's a palindrome? Give me an example.
How can I understand native speakers who talk really fast?
Is it 'different from' or 'different than'?
What's the longest word in English?
Why do people say 'bless you' after a sneeze?
Roughly how many languages are spoken in the world?
What's an oxymoron?
How can I improve my accent in a foreign language?
Is sign language the same everywhere?
Where does the word 'OK' come from?
What's the difference between 'affect' as a noun and 'affect' as a verb?
Why do some English words have silent letters?
How do I stop translating in my head when I speak another language?
Is it 'lay down' or 'lie down'?
What's the easiest language for an English speaker to learn?
i keep mixing up 'then' and 'than'. any trick?
What's the difference between 'farther' and 'further'?
""",
    "chitchat": """
Hello! Can you help me with something?
I'm so excited, I'm going to Paris next week!
What's a good question to ask to get to know someone?
I just learned to ride a bike at 30!
What should I name my new houseplant?
Give me a tongue twister.
What's a good icebreaker for a team meeting?
I can't decide between pizza and tacos tonight.
Would you rather be able to fly or be invisible?
It's snowing here for the first time this year!
I finally cleaned my whole apartment.
What's a good movie for a family night?
Tell me a clean joke about computers.
Recommend a song for a sunny morning.
What's something interesting I can learn in five minutes?
I baked my first loaf of bread today!
My team won the championship last night!
What's a good name for a book club?
I start a new job tomorrow, wish me luck!
How's your day going?
Give me a random word to inspire a drawing.
What's a fun thing to do on a Sunday morning?
I'm trying to learn to whistle. Any tips?
Do you have a favorite season?
What's a good riddle for kids?
I just ran my first 10K under an hour!
I'm procrastinating right now. Talk me out of it.
Can you help me pick a theme for my birthday party?
What's a nice thing I can do for a stranger today?
yo what's good
morning! need coffee badly
I got a new bike today and I love it.
Guess what, I finally beat my grandpa at chess.
What's a good word game to play on a road trip?
I'm bored at the airport. Keep me company?
Give me a fun would-you-rather question.
What's a good way to spend a free afternoon alone?
It's raining and I have nowhere to be. Perfect day?
""",
    "frustrated": """
My phone still says storage full even after I deleted a bunch of stuff.
The dishwasher leaves a white film on everything. Why??
I've reset my password three times this week and I still can't log in.
My toddler has woken up at 5am every day this week. I'm exhausted.
My plants keep dying no matter what I do.
I've been stuck in traffic for an hour and I'm going to miss dinner.
My coworker hits reply-all on every single email and it's driving me nuts.
My cake sank in the middle. Again.
The Wi-Fi at this hotel is useless and I have a deadline.
I keep paying for a gym membership and never going.
My upstairs neighbor's dog barks all day long.
Every time I try to budget I give up after a week.
I've studied Spanish for a year and still can't hold a conversation.
My cat threw up on the carpet again. How do I even clean this?
The bank blocked my card while I'm abroad. Now what?
My essay is due in two hours and I've written one paragraph.
I keep waking up at 3am and can't get back to sleep.
My car makes a squeaking noise every time I brake.
My manager changed the deadline for the third time this week.
My inbox is total chaos and I can't find anything.
The delivery driver left my package out in the rain.
I bought shoes online and they don't fit. Returning stuff is such a hassle.
My tomatoes split right before they were ripe. So annoying.
ugh my headphones keep disconnecting every few minutes
I left my umbrella on the train. Third one this year.
My bread machine loaf came out like a brick.
My spreadsheet formula keeps showing #VALUE! and I don't know why.
I can't stop hitting snooze every morning.
My video call froze right in the middle of my presentation.
The zipper on my favorite jacket just broke.
My kid lost another water bottle at school. That's the fourth one.
I've called the landlord five times about the leak and nothing happens.
Why does my printer need a new cartridge every two weeks?!
I planned a picnic and of course it's pouring rain.
""",
    "rude": """
Don't waffle. What's the capital of Canada?
Make it quick: how do I peel garlic fast?
You'll probably get this wrong, but how many ounces are in a pound?
Ugh, another bot. Fine, how do I reset my router?
Skip the pleasantries. How do I get a splinter out?
Is this going to be another useless answer? How do I fold a shirt fast?
I don't have all day. How long do I microwave a potato?
Try not to mess this up: what's 15% of 80?
You're not smart, you just read a lot. Prove me wrong.
Why do chatbots always sound so fake?
No lectures, please. Is it fine to eat cereal for dinner?
Bet you don't even know who painted the Mona Lisa.
Could you be any slower? Just tell me what time zone Tokyo is in.
I don't want your disclaimers. Is coffee bad for me or not?
Cut the fluff: how do I clean white sneakers?
You'll probably say something dumb, but what's a good gift for my dad?
Everything you say sounds like a greeting card. Why?
Give me a straight answer for once: should I rent or buy?
Wow, you really are as bad as everyone says.
Stop saying 'great question'. How many days are in a leap year?
Whatever. Just give me a dinner I can make with three ingredients.
Are you capable of a short answer? What's a synonym for 'fast'?
My last chatbot was useless. Are you any better?
Don't be cute. How do I get gum out of hair?
One sentence, no more: why is the ocean blue?
""",
    "advice_choices": """
Should I get a cat or a dog if I work long hours?
Is it better to rent near work or live somewhere cheaper with a long commute?
Should I learn to drive stick or automatic?
Is it worth learning a language with an app, or do I need a class?
Should I paint my small living room a light or dark color?
Is it better to buy a real Christmas tree or a fake one?
Should I go to my high school reunion?
Is it worth getting a second monitor for working from home?
Should I tell my friend her boyfriend was rude to me?
Is it better to read a book before seeing the movie?
Should I get bangs? I can't decide.
Is it worth repairing a five-year-old washing machine?
Should I take the job with more money or the one I'd enjoy more?
Is a standing desk worth it?
Should I move back in with my parents to save money?
Is it okay to skip a friend's birthday party if I'm exhausted?
Should I learn to cook or just meal prep simple stuff?
Is it worth paying extra for a direct flight?
Should I bring a gift to a dinner party if the host said not to?
Is it better to have one big TV or a projector?
""",
}

# ---------------------------------------------------------------------------------
# Request forms with their own hand-written fills: (form, topic, phrasings, fills).
# Each fill line (its parts split on " | ") is put into one of the form's phrasings.
# ---------------------------------------------------------------------------------

TEMPLATES = [
    (
        "define_word",
        "definitions",
        ["What does '{}' mean?", "what does '{}' mean", "What's the meaning of '{}'?", "I keep hearing '{}'. What does it mean?"],
        """
serendipity
ubiquitous
ephemeral
pragmatic
meticulous
candid
ambivalent
euphemism
ad hoc
bona fide
FOMO
carpe diem
déjà vu
schadenfreude
hygge
mise en place
al dente
net zero
escrow
quid pro quo
status quo
nuance
gaslighting
in lieu of
touch base
TL;DR
""",
    ),
    (
        "define_one_sentence",
        "definitions",
        ["Define {} in one sentence.", "In one sentence, what is {}?", "Can you give me a one-sentence definition of {}?"],
        """
a mortgage
a metaphor
photosynthesis
democracy
a carbon footprint
an ecosystem
a sonnet
an introvert
a recession
a podcast
gross domestic product
a placebo
a budget deficit
a haiku
a meme
a watershed
an allergy
a food desert
a startup
mindfulness
""",
    ),
    (
        "what_is_simple",
        "definitions",
        ["What is {}, in simple terms?", "Can you explain {} in simple words?", "What's {}? Keep it simple."],
        """
machine learning
a blockchain
a data center
a firewall
an algorithm
an annuity
an IP address
a cookie on a website
the stock market
a pension
quantum computing
a browser extension
open-source software
a deductible in insurance
a hybrid car
a heat pump
a smart thermostat
a spreadsheet pivot table
a QR code
a carbon offset
a genome
a nebula
""",
    ),
    (
        "explain_like_ten",
        "definitions",
        ["Explain {} like I'm ten.", "How would you explain to a kid {}?"],
        """
how a bank makes money
why we pay taxes
how the internet sends a photo
how a battery stores energy
why the moon has craters
how an engine makes a car move
what electricity is
how a bill becomes a law
why some things float and others sink
how a camera takes a picture
why we need sleep
how a submarine dives
what a volcano is
how recycling works
""",
    ),
    (
        "casual_whats",
        "definitions",
        ["whats {}", "whats {} exactly", "wait what is {}"],
        """
a roth ira
a spreadsheet
a sous vide
a hedge fund
an nft
a podcast feed
a gpu
a router
a sommelier
a quiche
a bento box
a bullet journal
a crumpet
""",
    ),
    (
        "difference",
        "comparisons",
        [
            "What's the difference between {} and {}?",
            "{} vs {}: what's the difference?",
            "Is there a real difference between {} and {}?",
        ],
        """
jam | jelly
a crocodile | an alligator
a storm watch | a storm warning
a latte | a cappuccino
a hurricane | a typhoon
an ape | a monkey
a psychologist | a psychiatrist
a rabbit | a hare
a simile | a metaphor
a turtle | a tortoise
an emigrant | an immigrant
herbs | spices
a frog | a toad
a sweet potato | a yam
a comet | an asteroid
Wi-Fi | the internet
a cold | the flu
a sprain | a strain
speed | velocity
a CV | a resume
a lake | a pond
a computer virus | a computer worm
a nap | a siesta
a bison | a buffalo
a cafe | a bistro
a moth | a butterfly
empathy | sympathy
a duvet | a comforter
""",
    ),
    (
        "which_better",
        "comparisons",
        ["{0} or {1}: which is better for {2}?", "Which is better for {2}, {0} or {1}?"],
        """
a laptop | a desktop | a university student
gas | induction | a small kitchen
running | cycling | bad knees
paper books | an e-reader | travel
a backpack | a suitcase | a two-week trip
tea | coffee | an afternoon pick-me-up
a podcast | an audiobook | a long commute
a gym | home workouts | someone on a budget
a cat | a rabbit | a small apartment
rice | quinoa | a quick side dish
texting | calling | making plans
a notebook | an app | keeping a to-do list
wool | fleece | a winter hike
a train | a plane | a 500-kilometer trip
yoga | stretching | a stiff back
a whiteboard | sticky notes | planning a project
hardwood | carpet | a house with pets
oats | toast | a filling breakfast
a hotel | a rental apartment | a family of five
bananas | energy gels | a long run
""",
    ),
    (
        "is_healthier",
        "comparisons",
        ["Is {} healthier than {}?", "Which is healthier, {} or {}?"],
        """
brown rice | white rice
honey | sugar
sparkling water | still water
frozen vegetables | fresh ones
dark chocolate | milk chocolate
sweet potatoes | regular potatoes
oat milk | cow's milk
a salad with dressing | a sandwich
walking | jogging
air-popped popcorn | chips
""",
    ),
    (
        "polite_rewrite",
        "rewrites",
        ['Make this sound more polite: "{}"', 'How can I say this more politely? "{}"', 'Rephrase this so it\'s less rude: "{}"'],
        """
Send me the report now.
You're wrong about the dates.
Stop being late to every meeting.
Why haven't you answered my email?
Move your car, it's blocking mine.
This isn't what I asked for.
Turn the music down.
Give me back my charger.
I need that invoice paid today.
Don't touch my stuff in the fridge.
Your presentation was too long.
Tell me why my order is late.
I can't come, I have better things to do.
Fix this by Friday.
Stop calling me after 9pm.
We're not hiring you.
Your dog keeps pooping on my lawn.
You forgot to include me again.
""",
    ),
    (
        "formal_rewrite",
        "rewrites",
        [
            "Can you make this more formal? '{}'",
            "Rewrite this for a work email: '{}'",
            "How would I say this professionally? '{}'",
        ],
        """
hey, can u send me the file asap
gonna be late, traffic is nuts
thanks a bunch for the help!
we gotta talk about the budget thing
sorry, totally forgot about the meeting
the new guy is starting monday, be nice
got your email, will look at it later
can't make it friday, something came up
the printer's busted again
lemme know if you need anything else
that deal sounds kinda sketchy to me
we're out of coffee, somebody buy more
nice job on the project, you crushed it
i'm sick today so i'm staying home
the client loved it, huge win
""",
    ),
    (
        "shorter_rewrite",
        "rewrites",
        ["Rewrite this to be shorter: '{}'", "Can you tighten this sentence? '{}'", "Make this less wordy: '{}'"],
        """
At this point in time we are not able to offer a refund for the item.
Due to the fact that it was raining, the game was cancelled.
I just wanted to reach out to see whether you might have some time to talk.
In my personal opinion, I think that the plan could possibly work.
We would like to take this opportunity to thank each and every one of you.
The reason why I am writing is because I have a question about my bill.
It is absolutely essential that everyone arrives on time without being late.
She made the decision to go ahead and start the project early.
Please be advised that the office will be closed on Monday for the holiday.
I am of the opinion that we should postpone the meeting until a later date.
In spite of the fact that he was tired, he kept on working.
For all intents and purposes, the two plans are basically the same thing.
There are many people who think that breakfast is important.
We are currently in the process of reviewing your application.
""",
    ),
    (
        "grammar_fix",
        "rewrites",
        ["Fix the grammar in this sentence: '{}'", "Is this sentence correct? '{}'", "what's wrong with this sentence: '{}'"],
        """
Me and him went to the store yesterday.
Their going to the park later.
She don't like coffee.
Everyone should bring their own lunch, its a long day.
Me and my friend was late.
The team have won there first game.
I should of called you earlier.
Between you and I, the plan won't work.
Less people came than we expected.
He walked quick to the bus stop.
The dog wagged it's tail.
Who's book is this?
I seen that movie last week.
If I was you, I would take the job.
Neither of the answers are correct.
She has went to the shop.
""",
    ),
    (
        "friendlier_rewrite",
        "rewrites",
        ["Make this sound friendlier: '{}'", "Can you make this notice sound warmer? '{}'"],
        """
Meeting moved to 3pm. Be there.
Your package could not be delivered.
Payment is overdue.
Do not park here.
Read the instructions before asking questions.
The kitchen must be cleaned after use.
Applications received after Friday will not be considered.
No refunds without a receipt.
Quiet hours start at 10pm.
Please stop leaving shoes in the hallway.
Reply by Monday or you lose your spot.
The pool is closed today.
""",
    ),
    (
        "plain_english",
        "rewrites",
        ["Say this in plain English: '{}'", "What does this actually mean? '{}'"],
        """
We need to leverage our synergies to optimize deliverables.
The medication should be administered twice daily with food.
The tenant shall remit payment no later than the first of each month.
Precipitation is expected to commence in the late afternoon.
Please ensure all personal belongings are retained at all times.
The aforementioned policy is effective immediately.
We are unable to ascertain the whereabouts of your parcel.
Let's circle back offline and take a deep dive next quarter.
Utilization of the elevator is prohibited in the event of a fire.
The vehicle sustained minor damage in the collision.
Your account has been placed on a temporary hold pending verification.
Consumption of food on the premises is not permitted.
""",
    ),
    (
        "exciting_rewrite",
        "rewrites",
        ["Make this sentence more exciting: '{}'", "Jazz this up for a poster: '{}'"],
        """
We are having a sale this weekend.
The library is open late on Thursdays.
Our bakery now sells muffins.
The school play is on Friday.
Sign-ups for the soccer team are open.
The museum has a new dinosaur exhibit.
We went hiking and saw a waterfall.
The town fair starts next week.
Our team finished the project on time.
My cat learned to open the door.
""",
    ),
    (
        "haiku",
        "creative",
        ["Write a haiku about {}.", "Can you write me a haiku about {}?", "haiku about {}, please"],
        """
morning coffee
a rainy bus stop
the first snow of winter
a sleeping cat
Monday mornings
the ocean at night
a lost sock
spring rain
a garden snail
city lights
moving house
a thunderstorm
fresh bread
a lighthouse
the last day of summer
a quiet library
an old bicycle
a full moon
the Wi-Fi going down
a paper airplane
dandelions
grandma's kitchen
a long train ride
cherry blossoms
a campfire
""",
    ),
    (
        "toast",
        "creative",
        ["Write a short toast for {}.", "I need a quick toast for {}. Can you help?", "Give me a two-line toast for {}."],
        """
my parents' 30th anniversary
a friend's new job
a coworker's retirement party
my brother's wedding
a housewarming party
a graduation dinner
New Year's Eve with old friends
a team that just finished a big project
my best friend's 40th birthday
a baby shower
a family reunion
Thanksgiving dinner
a farewell dinner for a neighbor who's moving
my grandmother's 90th birthday
a friend who just finished chemotherapy
my book club's tenth anniversary
a small office holiday party
a couple who just bought their first house
""",
    ),
    (
        "thank_you",
        "creative",
        [
            "Write a short thank-you note to {}.",
            "Help me write a thank-you card to {}.",
            "What's a nice way to thank {}? Just a few lines.",
        ],
        """
my aunt for the birthday sweater
a nurse who took great care of my dad
my kid's teacher at the end of the school year
a colleague who covered my shifts
my neighbor for shoveling my driveway
the host of last night's dinner party
a friend who helped me paint my apartment
a mentor who helped me get my first job
the mail carrier for always being cheerful
my in-laws for watching the kids all weekend
a stranger who returned my lost wallet
my coach after my last season
a bakery that made our wedding cake
my team for a great year
a friend who visited me in the hospital
my landlord for fixing the heater so quickly
a speaker who visited our class
my grandparents for the graduation gift
""",
    ),
    (
        "limerick",
        "creative",
        ["Write a limerick about {}.", "Can you make up a limerick about {}?"],
        """
a cat who loves cheese
a forgetful wizard
a dog on a skateboard
a very slow snail
a chef who hates onions
a penguin on vacation
a sneezing giraffe
a robot that dances
my messy roommate
a goat who eats homework
a squirrel who steals pizza
a grumpy alarm clock
""",
    ),
    (
        "two_sentence_story",
        "creative",
        ["Write a two-sentence story about {}.", "Tell me a very short story about {}, two sentences max."],
        """
a lighthouse keeper
a lost key
the last cookie in the jar
a dragon who is afraid of the dark
a time traveler at a bus stop
a kid's first day of school
a message in a bottle
a robot learning to paint
an old piano in the attic
a snowman that refuses to melt
a detective who is also a cat
a wrong number that changed everything
a tree that grows books
a shy ghost
a picnic interrupted by ants
""",
    ),
    (
        "birthday_message",
        "creative",
        [
            "Give me a short birthday message for {}.",
            "What should I write in a birthday card for {}?",
            "Write a one-line birthday text for {}.",
        ],
        """
my grandpa turning 90
a coworker I don't know very well
my 10-year-old nephew
my best friend who lives abroad
my mom
my boss
a friend turning 30 who hates birthdays
my twin sister
my dog, who turns two today
an old teacher I still keep in touch with
my neighbor's little girl
a friend who just had a rough year
my husband
a teammate on my soccer team
""",
    ),
    (
        "four_line_poem",
        "creative",
        ["Write a four-line poem about {}.", "Write me a short rhyming poem about {}."],
        """
friendship
the sea
a rainy Sunday
a cup of tea
growing old together
the night sky
learning to ride a bike
a city waking up
a letter from home
the smell of rain
a small garden
the first day of spring
""",
    ),
    (
        "slogan",
        "creative",
        ["Write a one-line slogan for {}.", "Come up with a catchy slogan for {}.", "I need a tagline for {}. Any ideas?"],
        """
a neighborhood bakery
a dog-walking business
a library summer reading challenge
a school recycling campaign
a bike repair shop
a community garden
a local farmers' market
a tutoring service
a car wash fundraiser
a charity fun run
a family-run pizza place
a plant shop
""",
    ),
    (
        "name_ideas",
        "creative",
        ["Suggest a name for {}.", "What should I call {}?", "Give me three name ideas for {}."],
        """
a cozy coffee shop
a fantasy football team
our family group chat
a weekend hiking club
a fluffy gray kitten
a blog about growing vegetables
a jazz trio
a podcast about old movies
a taco food truck
a small sailboat
a trivia team
a houseplant shop
a knitting circle
a robot vacuum
a running club for beginners
a homemade hot sauce
a baby goat
a study group for chemistry
a neighborhood newsletter
a board game night
""",
    ),
    (
        "caption",
        "creative",
        ["Write a short caption for a photo of {}.", "Suggest an Instagram caption for a picture of {}."],
        """
my dog in a raincoat
our first family camping trip
a sunset at the beach
my homemade pizza
my friends at graduation
a snowy mountain cabin
my grandma teaching me to bake
a tiny kitten asleep in a shoe
my new bookshelf
a foggy morning in the city
my garden's first tomato
our team after winning the game
""",
    ),
    (
        "get_well",
        "creative",
        ["Write a short get-well message for {}.", "What's a kind get-well note for {}?"],
        """
a coworker who broke her leg
my neighbor recovering from surgery
a friend with the flu
my grandpa in the hospital
a classmate who's been sick for weeks
my boss who's having knee surgery
a child with chickenpox
my friend's mom
a teammate with a sprained ankle
a pen pal I've never met
""",
    ),
    (
        "apology_text",
        "creative",
        ["Write a short apology text to {}.", "Help me word a quick apology to {}."],
        """
my friend for missing her birthday dinner
my partner for snapping at them this morning
a coworker for forgetting our meeting
my neighbor for the loud party last night
my sister for not calling back
a client for sending the wrong file
my roommate for eating their leftovers
my mom for forgetting Mother's Day
a friend for canceling our plans twice
my team for the late report
a classmate for not doing my part of the project
my dog walker for the last-minute change
""",
    ),
    (
        "riddle_answer",
        "creative",
        ["Write a riddle whose answer is {}.", "Make up a riddle where the answer is {}."],
        """
a clock
an umbrella
a shadow
a candle
a piano
a map
an echo
a snowman
a towel
a key
""",
    ),
    (
        "list_three",
        "lists",
        ["List three {}.", "What are three {}?", "Give me three {}."],
        """
ways to reuse glass jars
quick stretches I can do at my desk
board games for two players
questions to ask a landlord before signing a lease
things to check before a long drive
signs that a melon is ripe
easy meals to cook when I'm sick
ways to make a small bathroom look bigger
podcast topics for a beginner
ways to be more eco-friendly at work
things to do before a job interview
healthy snacks for kids
ways to practice a new language every day
fun things to do on a snow day
ways to save water at home
mistakes new gardeners make
things to bring to a baby shower
ways to celebrate a coworker's birthday on a budget
reasons to learn to cook
questions to ask at a parent-teacher meeting
""",
    ),
    (
        "quick_ideas",
        "lists",
        ["Give me {} quick ideas for {}.", "I need {} ideas for {}. Go!"],
        """
three | a cheap date night
three | using up leftover chicken
four | a team-building activity
three | decorating a small balcony
three | a lazy Sunday breakfast
five | a 10-minute workout
three | a kid's birthday party at home
four | a themed dinner party
three | keeping my desk tidy
three | a rainy day with teenagers
four | a girls' night in
three | a gift for a coworker
three | a fun family photo
three | a quick packed lunch
four | an easy school science project
three | a community fundraiser
three | a weekend project around the house
three | a budget-friendly vacation
three | an anniversary surprise
three | a lunch break walk
""",
    ),
    (
        "name_some",
        "lists",
        ["Name {} {}.", "Can you name {} {}?"],
        """
five | fruits high in vitamin C
three | planets with rings
four | brass instruments
two | mammals that lay eggs
five | famous women scientists
three | countries that border Brazil
four | herbs that grow well indoors
three | classic novels for teenagers
five | vegetables I can grow in a pot
three | birds that can't fly
four | types of clouds
three | inventions from ancient China
five | board games for a family
three | foods that are good sources of iron
four | kinds of pasta shapes
three | ways to say hello in other languages
""",
    ),
    (
        "must_haves",
        "lists",
        ["What are a few must-haves for {}?", "What should be on a checklist for {}?"],
        """
a first-time homeowner
a new cyclist
a beginner cook
a college dorm room
a new puppy
a home office
a camping trip
a baby's first month
a beach day
a winter car kit
a picnic
a first apartment
""",
    ),
    (
        "fun_fact",
        "fun_facts",
        ["Tell me a fun fact about {}.", "Give me one cool fact about {}.", "fun fact about {}?"],
        """
sloths
the Eiffel Tower
the human brain
Saturn
koalas
the Sahara Desert
chocolate
owls
the Olympics
pineapples
penguins
the Amazon River
giraffes
volcanoes
coffee
dolphins
the Great Barrier Reef
bananas
Antarctica
sharks
hummingbirds
the piano
""",
    ),
    (
        "surprising",
        "fun_facts",
        ["What's something surprising about {}?", "Tell me something most people don't know about {}."],
        """
crows
the human nose
trees
the moon
ants
honey
the Mona Lisa
Iceland
jellyfish
our sense of taste
carrots
snails
sleep
the Statue of Liberty
""",
    ),
    (
        "synonym",
        "words",
        ["What's another word for '{}'?", "Give me a synonym for '{}'.", "What's a fancier way to say '{}'?"],
        """
tired
big
important
interesting
nice
said
walk
smart
beautiful
difficult
help
use
show
start
bad
funny
angry
quickly
""",
    ),
    (
        "idiom",
        "words",
        ["What does the phrase '{}' mean?", "Where does the saying '{}' come from?", "What does it mean to say '{}'?"],
        """
break the ice
under the weather
spill the beans
the ball is in your court
bite off more than you can chew
once in a blue moon
hit the sack
cost an arm and a leg
let the cat out of the bag
on thin ice
cut corners
a piece of cake
burn the midnight oil
the elephant in the room
back to square one
call it a day
hit the nail on the head
jump on the bandwagon
when pigs fly
read between the lines
barking up the wrong tree
beat around the bush
""",
    ),
    (
        "translate",
        "words",
        ["How do you say '{}' in {}?", "What's '{}' in {}?"],
        """
good morning | Italian
thank you very much | Japanese
where is the train station | Spanish
nice to meet you | German
cheers | French
excuse me | Korean
how much does this cost | Portuguese
happy birthday | Dutch
I don't understand | Italian
see you tomorrow | Spanish
can I have the bill, please | French
good night | Swedish
I'm vegetarian | German
where is the bathroom | Greek
congratulations | Turkish
I love you | Hindi
welcome | Arabic
""",
    ),
]


# ---------------------------------------------------------------------------------


def norm(text: str) -> str:
    """Lowercased, whitespace-collapsed text: what duplicates are compared on."""
    return " ".join(text.lower().split())


STOPWORDS = set(
    """
a an the i me my we our you your it its is are was be do does did to of in on at for
with and or but so if how what whats what's why when where which who can could should
would will any some that this there their them they he she his her just really
""".split()
)


def content_key(text: str) -> tuple:
    """Content words as a sorted set (naively de-pluralized): near-duplicate signature."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    out = set()
    for w in words:
        w = w.strip("'")
        if w.endswith("'s"):
            w = w[:-2]
        if not w or w in STOPWORDS:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return tuple(sorted(out))


def lines(block: str) -> list[str]:
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def slots(pattern: str) -> int:
    """How many fill parts a pattern takes ("{}" fields, or the distinct "{0}", "{1}" ...)."""
    fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    return len(fields) if all(f == "" for f in fields) else len(set(fields))


def build_additions() -> list[tuple[str, str, str, str]]:
    """(topic, form, phrasing, prompt) for every prompt this script adds, in declaration order.

    A template's phrasing for each fill is drawn with a generator seeded by SEED and
    the form's name, so adding or editing one template leaves the others as they are.
    """
    items = []
    for topic, block in HANDWRITTEN.items():
        items += [(topic, "handwritten", "", p) for p in lines(block)]
    for form, topic, patterns, block in TEMPLATES:
        rng = random.Random(f"{SEED}:{form}")
        for fill in lines(block):
            parts = [p.strip() for p in fill.split(" | ")]
            pattern = rng.choice(patterns)
            if any(slots(p) != len(parts) for p in patterns):
                sys.exit(f"template {form}: fill {fill!r} has {len(parts)} parts, not what its phrasings need")
            text = pattern.format(*parts)
            if pattern.startswith("{"):  # a fill opens the sentence
                text = text[0].upper() + text[1:]
            items.append((topic, form, pattern, text))
    return items


def split(items: list[tuple[str, str, str, str]], rng: random.Random) -> tuple[list, list]:
    """Each topic's prompts shuffled and about EVAL_FRACTION of them sent to eval."""
    train, held = [], []
    topics = list(dict.fromkeys(it[0] for it in items))
    for topic in topics:
        group = [it for it in items if it[0] == topic]
        rng.shuffle(group)
        k = round(len(group) * EVAL_FRACTION)
        held += group[:k]
        train += group[k:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def read_prompts(path: Path, only_prompt: bool = True) -> list[str]:
    """The ``prompt`` of each line; ``only_prompt``: lines must hold nothing else."""
    out = []
    raw = path.read_bytes().decode("utf-8")
    for i, line in enumerate(raw.split("\n")):
        if not line:
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or (only_prompt and set(row) != {"prompt"}):
            raise ValueError(f'{path.name} line {i + 1}: not a {{"prompt": str}} object')
        out.append(row["prompt"])
    return out


def dump(prompts: list[str]) -> str:
    return "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)


def text_problems(p: str) -> list[str]:
    problems = []
    n = len(p.split())
    if not MIN_WORDS <= n <= MAX_WORDS:
        problems.append(f"{n} words")
    if p != p.strip():
        problems.append("surrounding whitespace")
    if any(c in BAD_CHARS or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in p):
        problems.append("control or separator character")
    return problems


def check(train: list[str], held: list[str], sft: list[str], additions=None) -> list[str]:
    """Every invariant; returns the failures (empty: all pass)."""
    errors = []
    if len(train) < MIN_TRAIN:
        errors.append(f"train has {len(train)} prompts, fewer than {MIN_TRAIN}")
    if len(held) < MIN_EVAL:
        errors.append(f"eval has {len(held)} prompts, fewer than {MIN_EVAL}")
    for name, prompts in (("train", train), ("eval", held)):
        for p in prompts:
            for problem in text_problems(p):
                errors.append(f"{name}: {problem}: {p!r}")
        counts = Counter(norm(p) for p in prompts)
        errors += [f"{name}: duplicate {p!r}" for p, c in counts.items() if c > 1]
    train_n, held_n, sft_n = {norm(p) for p in train}, {norm(p) for p in held}, {norm(p) for p in sft}
    errors += [f"in both train and eval: {p!r}" for p in sorted(train_n & held_n)]
    errors += [f"eval prompt in sft.jsonl: {p!r}" for p in sorted(held_n & sft_n)]
    base = set(map(norm, train[:BASE_TRAIN] + held[:BASE_EVAL]))
    added = train[BASE_TRAIN:] + held[BASE_EVAL:]
    errors += [f"added prompt in sft.jsonl: {p!r}" for p in added if norm(p) in sft_n]
    # near duplicates: an added prompt with the same content words as any other prompt
    seen = {}
    for p in train[:BASE_TRAIN] + held[:BASE_EVAL] + sft + added:
        key = content_key(p)
        if key in seen and norm(p) not in base and norm(p) not in sft_n:
            errors.append(f"near duplicate: {p!r} ~ {seen[key]!r}")
        seen.setdefault(key, p)
    if additions is not None:
        total = len(train) + len(held)
        forms = Counter(form for _, form, _, _ in additions if form != "handwritten")
        phrasings = Counter(phrasing for _, _, phrasing, _ in additions if phrasing)
        for what, counts in (("template", forms), ("phrasing", phrasings)):
            for form, c in counts.items():
                if c > MAX_TEMPLATE_SHARE * total:
                    errors.append(f"{what} {form!r} makes {c} of {total} prompts (> {MAX_TEMPLATE_SHARE:.0%})")
        added_train = {norm(p) for p in train[BASE_TRAIN:]}
        added_held = {norm(p) for p in held[BASE_EVAL:]}
        by_topic = Counter(it[0] for it in additions)
        held_by_topic = Counter(t for t, _, _, p in additions if norm(p) in added_held)
        for topic, n in by_topic.items():
            k = held_by_topic[topic]
            if abs(k - n * EVAL_FRACTION) > 1 or (n >= 6 and not 0 < k < n):
                errors.append(f"topic {topic}: {k} of {n} in eval, not about {EVAL_FRACTION:.0%}")
        if len(added_train) + len(added_held) != len(additions):
            errors.append("additions lost or duplicated in the split")
    return errors


def describe(additions, train, held) -> None:
    topics = Counter(it[0] for it in additions)
    forms = Counter(it[1] for it in additions)
    phrasings = Counter(it[2] for it in additions if it[2])
    added_held = {norm(p) for p in held[BASE_EVAL:]}
    print(f"train: {len(train)} prompts ({BASE_TRAIN} kept + {len(train) - BASE_TRAIN} added)")
    print(f"eval:  {len(held)} prompts ({BASE_EVAL} kept + {len(held) - BASE_EVAL} added)")
    print(
        f"additions: {len(additions)} prompts, {len(topics)} topics, "
        f"{forms['handwritten']} hand-written lines + {len(forms) - 1} templated forms "
        f"in {len(phrasings)} phrasings ({len(additions) - forms['handwritten']} prompts)"
    )
    for topic, n in topics.items():
        k = sum(1 for t, _, _, p in additions if t == topic and norm(p) in added_held)
        print(f"  {topic:16s} {n:4d}  eval {k:3d}")
    total = len(train) + len(held)
    top = forms.most_common(4)
    print("largest templated forms:", ", ".join(f"{f} {c} ({c / total:.1%})" for f, c in top if f != "handwritten"))
    print("largest phrasings:", ", ".join(f"{f!r} {c} ({c / total:.1%})" for f, c in phrasings.most_common(3)))
    openings = Counter(" ".join(norm(p).split()[:3]) for p in train + held)
    print("commonest openings:", ", ".join(f"'{o}' {c / total:.1%}" for o, c in openings.most_common(5)))


def main() -> int:
    only_check = "--check" in sys.argv[1:]
    sft = read_prompts(SFT_FILE, only_prompt=False)
    current_train, current_eval = read_prompts(TRAIN_FILE), read_prompts(EVAL_FILE)
    if len(current_train) < BASE_TRAIN or len(current_eval) < BASE_EVAL:
        print("the prompt files have fewer lines than the kept base; restore them from git first")
        return 1
    additions = build_additions()
    train_add, held_add = split(additions, random.Random(SEED))
    train = current_train[:BASE_TRAIN] + [it[3] for it in train_add]
    held = current_eval[:BASE_EVAL] + [it[3] for it in held_add]
    if only_check:
        if (current_train, current_eval) != (train, held):
            print("the files differ from what this script writes; run it without --check")
            return 1
    else:
        TRAIN_FILE.write_bytes(dump(train).encode("utf-8"))
        EVAL_FILE.write_bytes(dump(held).encode("utf-8"))
    # check what is on disk, read back
    train_disk, held_disk = read_prompts(TRAIN_FILE), read_prompts(EVAL_FILE)
    errors = check(train_disk, held_disk, sft, additions)
    if (train_disk, held_disk) != (train, held):
        errors.append("the files read back differ from what was written")
    describe(additions, train_disk, held_disk)
    if errors:
        print(f"\nFAILED: {len(errors)} problem(s)")
        for e in errors:
            print("  " + e)
        return 1
    print("\nall checks pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
